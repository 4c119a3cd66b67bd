"""The reliability tests share tests/helpers.py's command-line runners (re-exported here) and the
demo16 and same_threads fixtures of tests/conftest.py."""
from helpers import FAST, REPO, popen_cli, run_cli, write_list  # noqa: F401  (re-exported to the tests)
from helpers import assert_user_error as assert_one_line_error  # noqa: F401
