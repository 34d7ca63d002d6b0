"""Measuring generators: COCO-2014's FID, CLIP score and FD-DINOv2 of a student or a teacher (coco.py, the command
`python -m evaluation`; prompts.py: which captions; generate.py: the images; metrics.py: the networks), and the
Frechet distance the miniature uses too (frechet.py). Importing the package loads none of them."""
