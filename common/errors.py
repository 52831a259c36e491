"""The one exception type for user mistakes (bad file, bad option, mismatched models).

The CLI turns it into a one-line message and exit code 2, never a traceback. Its message must say
what is wrong and how to fix it.
"""


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and what to do."""
