"""Hugging Face checkpoints in and out (moejax/hf/convert.py); `python -m moejax.hf`.

    from moejax import hf
    model, variables = hf.load_pretrained('path/to/hf_folder')
    logits, aux = model.apply(variables, input_ids)
"""
from moejax.hf.convert import export_workdir, import_workdir, load_pretrained

__all__ = ['export_workdir', 'import_workdir', 'load_pretrained']
