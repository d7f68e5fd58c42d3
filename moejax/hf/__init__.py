"""Hugging Face checkpoints in (moejax/hf/convert.py) and out (export.py); `python -m moejax.hf`.

    from moejax import hf
    model, variables = hf.load_pretrained('path/to/hf_folder')
    logits, aux = model.apply(variables, input_ids)
"""
from moejax.hf.convert import import_workdir, load_pretrained
from moejax.hf.export import export_workdir

__all__ = ['export_workdir', 'import_workdir', 'load_pretrained']
