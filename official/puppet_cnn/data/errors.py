"""The one exception type raised for missing, empty or corrupt data."""


class DataError(ValueError):
  """Data that is missing, empty, corrupt or not in the expected layout.

  Every loader in `official.puppet_cnn.data` turns low-level failures
  (`pickle`, `tarfile`, `zlib`, PIL, ...) into a single `DataError` whose
  message names the offending path and says what was expected, so that users
  never have to read a raw unpickling or tarfile traceback. It subclasses
  `ValueError` so callers that already catch `ValueError` keep working.
  """
