"""python -m evaluation: the command line of evaluation/coco.py (its docstring is the help's)."""
from evaluation.coco import main

if __name__ == "__main__":
    main()
