"""Exceptions raised when a dataset cannot be found or prepared."""


class DatasetNotFoundError(RuntimeError):
    """The dataset is not prepared and cannot be prepared from here.

    The message says which files to put in which folder and which config field
    (`--config.data.manual_dir=...`) to set.
    """


class CorruptDatasetFileError(DatasetNotFoundError):
    """A file in `manual_dir` is not the original dataset file (truncated, wrong format...)."""
