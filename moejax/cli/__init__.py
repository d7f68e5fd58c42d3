"""What every command shares (the commands themselves are python -m moejax.X): config files by
path or by name (configs.py), arguments, overrides and one-line errors (args.py), and the flags
of a multi-host run (distributed.py)."""
from moejax.cli.args import (CONFIG_HELP, ArgumentParser, HelpFormatter, add_config_args,
                             apply_overrides, parse, parse_value, run, split_overrides)
from moejax.cli.configs import (config_path, load_config, load_module, named_configs,
                                shipped_names, shipped_path)
from moejax.cli.distributed import add_distributed_args, init_distributed

__all__ = ['CONFIG_HELP', 'ArgumentParser', 'HelpFormatter', 'add_config_args', 'add_distributed_args',
           'apply_overrides', 'config_path', 'init_distributed', 'load_config', 'load_module',
           'named_configs', 'parse', 'parse_value', 'run', 'shipped_names', 'shipped_path',
           'split_overrides']
