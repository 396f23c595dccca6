"""Fixtures shared by the tests: the prepared digits data."""

import pytest

from examples import input_pipeline


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """A TFDS data dir with the digits dataset prepared (TFDS prints progress once)."""
  path = str(tmp_path_factory.mktemp("tfds"))
  input_pipeline.get_datasets("digits", path)
  return path


@pytest.fixture(scope="session")
def digits(data_dir):
  """The digits splits, decoded: ``(train, test, metadata)``."""
  train, test, metadata = input_pipeline.get_datasets("digits", data_dir)
  return input_pipeline.load_split(train), input_pipeline.load_split(test), metadata
