"""The mutation check (tools/mutants.py): its mutants fit the code, and the direction test catches g's sign reversed
for VSD alone, for SDS alone and for both, where the unmutated code passes it. The whole check (every mutant against
the whole suite) is `python -m tools.mutants`: docs/testing.md#the-mutation-check."""
import os

import pytest

from tools import mutants

DIRECTION_TEST = "test_swiftbrush.py::test_a_step_moves_the_students_image_where_its_equation_says"


def test_every_mutant_fits_the_code_once_and_compiles():
    assert len({m.name for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
    for m in mutants.MUTANTS:
        with open(os.path.join(mutants.ROOT, m.file), encoding="utf-8") as f:
            text = f.read()
        changed = mutants.mutated(m, text)
        assert changed != text, m.name
        compile(changed, m.file, "exec")
    with pytest.raises(mutants.MutantError, match="update tools/mutants.py"):
        mutants.mutated(mutants.Mutant("gone", "", "swiftbrush.py", (("no such text", ""),)), "some code")


def test_the_suite_is_every_test_file_but_the_checks_own():
    suite = mutants.the_suite()
    assert suite[0] == "test_swiftbrush.py" and "tools/test_mutants.py" not in suite
    assert {"harness/test_distributed.py", "miniature/test_miniature.py", "tools/test_precision.py"} <= set(suite)


def test_the_direction_test_catches_each_sign_reversal_and_passes_the_method():
    assert mutants.check(mutants.Mutant("none", "nothing", "swiftbrush.py", ()), [DIRECTION_TEST]) == ("survived", "")
    expected = {"vsd-sign": "[vsd-x0]", "sds-sign": "[sds-x0]", "both-signs": "[vsd-x0]"}  # -x: the first failure
    named = {m.name: m for m in mutants.MUTANTS}
    for name, case in expected.items():
        assert mutants.check(named[name], [DIRECTION_TEST]) == ("caught", DIRECTION_TEST + case), name
