"""The one exception type for problems a user can cause and fix."""


class LdmGroundError(ValueError):
    """Bad input or configuration: the message says which file or field and what to do."""
