"""Registers ``optimum-cli odllm compress|evaluate|train|export`` (optimum scans ``optimum.commands.register``).

Kept lightweight: optimum imports every register module on each ``optimum-cli`` call, so the argument
definitions are loaded from ``optimum_odllm/cli_options.py`` (stdlib only) without importing the
``optimum_odllm`` package (torch, transformers); the work is imported only when a command runs.
"""

import importlib.util
import sys
from pathlib import Path

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


def _load_options():
    name = "_optimum_odllm_cli_options"  # cli_options loads settings.py beside it the same way
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("optimum_odllm")  # locates the package without executing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("optimum-odllm is not installed: `pip install optimum-odllm`.")
    path = Path(list(spec.submodule_search_locations)[0]) / "cli_options.py"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


_OPTIONS = _load_options()


class _ODLLMLeafCommand(BaseOptimumCLICommand):
    NAME = ""

    @classmethod
    def parse_args(cls, parser):  # called by optimum with the subcommand's parser
        parser.description = _OPTIONS.COMMAND_HELP[cls.NAME]
        _OPTIONS.ADDERS[cls.NAME](parser)

    def run(self):
        from optimum_odllm.cli import run_command

        run_command(self.NAME, self.args)


class ODLLMCompressCommand(_ODLLMLeafCommand):
    NAME = "compress"


class ODLLMEvaluateCommand(_ODLLMLeafCommand):
    NAME = "evaluate"


class ODLLMTrainCommand(_ODLLMLeafCommand):
    NAME = "train"


class ODLLMExportCommand(_ODLLMLeafCommand):
    NAME = "export"


class ODLLMCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="odllm", help=_OPTIONS.COMMAND_HELP["odllm"])
    SUBCOMMANDS = tuple(
        CommandInfo(name=cls.NAME, help=_OPTIONS.COMMAND_HELP[cls.NAME], subcommand_class=cls)
        for cls in (ODLLMCompressCommand, ODLLMEvaluateCommand, ODLLMTrainCommand, ODLLMExportCommand)
    )

    def run(self):  # no subcommand given: usage on stderr and exit status 2, as argparse does for errors
        self.parser.print_usage(sys.stderr)
        self.parser.exit(2, f"{self.parser.prog}: error: choose a command: {', '.join(_OPTIONS.ADDERS)}\n")


REGISTER_COMMANDS = [ODLLMCommand]
