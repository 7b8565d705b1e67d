"""The test command's two pytest runs (the suite, then the tests marked ``alone``) make one exit code."""

from portal.testing import NO_TESTS, combined


def test_a_failure_in_either_run_fails_the_command():
    assert combined([1, 0]) == 1
    assert combined([0, 1]) == 1
    assert combined([NO_TESTS, 2]) == 2


def test_no_tests_is_an_error_only_when_neither_run_ran_any():
    assert combined([0, NO_TESTS]) == 0
    assert combined([NO_TESTS, 0]) == 0
    assert combined([NO_TESTS, NO_TESTS]) == NO_TESTS
