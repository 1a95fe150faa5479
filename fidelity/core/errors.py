"""The one exception type users can cause."""


class FidelityError(Exception):
    """An error caused by user input (suite file, names, data, settings).

    The message names the offending input and, where there is one, the fix. The CLI prints it
    on one line and exits with status 2.
    """
