"""The datasets of the task YAML files in this folder, read from the files beside them (not an
experiment; lm-eval imports it through a YAML's `custom_dataset: !function
local_files.json_lines`), so the tasks run from any working directory and from an installed
moejax."""
import os


def json_lines(data_files: dict, **_):
  """{split: datasets.Dataset} of JSON lines files named relative to this folder.

  Args:
    data_files: {split name: file name}, the YAML's dataset_kwargs.
    **_: the task's metadata, which lm-eval passes too.
  """
  import datasets
  here = os.path.dirname(os.path.abspath(__file__))
  return datasets.load_dataset(
      'json', data_files={split: os.path.join(here, name) for split, name in data_files.items()})
