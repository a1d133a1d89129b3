class UserInputError(Exception):
    """A problem with what the user gave us (paths, flags, data), reported as one line without a traceback."""
