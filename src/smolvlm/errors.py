"""The one exception type the CLI turns into a single clear line (no traceback)."""


class SmolVLMError(Exception):
    """A problem with the user's input (file, image, checkpoint, option), with what to do about it."""
