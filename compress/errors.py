"""User-facing errors: one line, naming the problem and the fix; the CLI maps them to exit code 2."""


class UserError(Exception):
    """Bad input from the user (unknown model, missing file, unsupported option...).

    The message must be one line that says what is wrong and how to fix it.
    """

    exit_code = 2
