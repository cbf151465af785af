"""What every command of the project shares at run time: device, dtype, progress bar, summary,
and the command-line flags derived from config dataclasses (:func:`option`, :class:`Flags`,
:func:`config_command`).

One vocabulary across ``dataprep`` and ``softrepa``: ``--device`` is
``auto|cpu|cuda|cuda:N|mps`` and ``--dtype`` is ``auto|float32|bfloat16|float16``.
torch and rich are imported inside the functions, so ``--help`` never loads them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import re
import time
import types
import typing
from contextvars import ContextVar
from collections import Counter
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from dataprep.errors import ConfigError, print_error, reason_of

DEVICES = "auto, cpu, cuda, cuda:N or mps"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_device(device: str) -> None:
    """ConfigError naming --device unless ``device`` is a word of the vocabulary: checked when a
    config is built, since torch would only refuse it once the weights loaded."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise ConfigError(f"invalid device {device!r}", "--device", f"use {DEVICES}")


def check_dtype(dtype: str) -> None:
    """ConfigError naming --dtype unless ``dtype`` is one of :data:`DTYPES`."""
    if dtype not in DTYPES:
        raise ConfigError(f"invalid dtype {dtype!r}", "--dtype", f"use {', '.join(DTYPES[:-1])} or {DTYPES[-1]}")


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("CUDA is not available on this machine", "--device", "use --device cpu, or install a CUDA build of torch")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def progress_bar(description: str, total: int | None, enabled: bool = True, transient: bool = False):
    """The project's one progress bar (rich, with items/s); a no-op object when disabled; ``transient`` clears it when done."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    class _Rate(TextColumn):
        def render(self, task):  # items/s, the figure researchers compare across engines
            from rich.text import Text

            speed = task.finished_speed or task.speed
            return Text(f"{speed:.2f}/s" if speed else "-/s")

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _Rate(""),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=transient,
    )


@dataclass
class StageSummary:
    stage: str
    out_dir: Path
    run_id: str
    done: int = 0  # rows generated good in this run
    skipped: int = 0  # already had a good row
    failed: Counter = field(default_factory=Counter)  # reason -> rows
    left_out: Counter = field(default_factory=Counter)  # reason -> input rows not used on purpose (batches: edits the checker failed)
    truncated: int = 0  # good rows that hit --max-new-tokens
    wall_s: float = 0.0
    shards: list[Path] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific figures (e.g. pass rate)
    # what ``done`` counts: rows for the model stages; batches, train steps, evaluated edits elsewhere
    unit: str = "rows"
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    @property
    def n_failed(self) -> int:
        return sum(self.failed.values())

    @property
    def rate(self) -> float:
        """``unit`` per second of wall time. Failed rows count for a row stage (the model or the
        decoder spent the time); elsewhere ``failed`` counts other things (train: batch rows it
        could not use) and only ``done`` is a rate."""
        n = self.done + (self.n_failed if self.unit == "rows" else 0)
        return n / self.wall_s if self.wall_s > 0 else 0.0

    def fail(self, error: str) -> None:
        self.failed[reason_of(error)] += 1

    def finish(self) -> "StageSummary":
        self.wall_s = time.perf_counter() - self._t0
        return self

    def counts(self) -> dict[str, int]:
        """The counts every manifest starts with, whatever the stage; stage-specific ones are added after."""
        return {"done": self.done, "skipped": self.skipped, "failed": self.n_failed, "left_out": sum(self.left_out.values()), "truncated": self.truncated}


def print_summary(summary: StageSummary, console=None, title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=title or f"{summary.stage}: summary", show_header=True, header_style="bold")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row(f"{summary.stage if summary.unit == 'rows' else summary.unit} (this run)", str(summary.done))
    t.add_row("skipped (already done)", str(summary.skipped))
    t.add_row("failed", str(summary.n_failed))
    for reason, n in sorted(summary.failed.items(), key=lambda kv: (-kv[1], kv[0])):
        t.add_row(f"  failed: {reason}", str(n))
    if summary.left_out:
        t.add_row("left out (not used, by rule)", str(sum(summary.left_out.values())))
        for reason, n in sorted(summary.left_out.items(), key=lambda kv: (-kv[1], kv[0])):
            t.add_row(f"  left out: {reason}", str(n))
    if summary.truncated:
        t.add_row("hit --max-new-tokens (finish_reason=length)", str(summary.truncated))
    for k, v in summary.extra.items():
        t.add_row(k, v if isinstance(v, str) else f"{v:.3g}" if isinstance(v, float) else str(v))
    t.add_row("wall time", f"{summary.wall_s:.1f} s")
    t.add_row("rate", f"{summary.rate:.2f} {summary.unit}/s")
    t.add_row("shards", str(summary.out_dir))
    console.print(t)


# ------------------------------------------------------------ command-line flags from config dataclasses
# A config dataclass is the one place a setting's default, help text and
# validation live: ``option()`` puts the help (and, where it is not
# ``--field-name``, the flag and its help panel) into the field's metadata, and
# ``config_command`` turns the fields into typer options and the parsed values
# back into the dataclass, whose ``__post_init__`` validates them. The
# dataclass is named as "module:Class" and imported only when its command runs
# or shows its --help, so ``dataprep --help`` never imports pyarrow or torch.

CLI_META = "cli"
_GROUPS_ATTR = "__config_flags__"
_FLAG_VALUES: ContextVar[dict[str, Any]] = ContextVar("config_flag_values", default={})  # set while a command runs


@dataclass(frozen=True)
class CliFlag:
    help: str
    flag: str | tuple[str, ...] | None = None  # default: --field-name (a bool: the bare switch)
    panel: str | None = None
    hidden: bool = False


def option(default: Any = MISSING, help: str = "", *, flag: str | tuple[str, ...] | None = None, panel: str | None = None,
           factory: Any = MISSING, hidden: bool = False) -> Any:
    """A dataclass field with its command-line flag beside its default."""
    return field(default=default, default_factory=factory, metadata={CLI_META: CliFlag(help, flag, panel, hidden)})


def at_least(value: float, minimum: float, flag: str, fix: str) -> None:
    """The commonest check of a numeric field: ConfigError naming ``flag`` unless ``value >= minimum``."""
    if value < minimum:
        raise ConfigError(f"{flag} {value} is " + ("negative" if minimum == 0 else f"less than {minimum}"), flag, fix)


@dataclass(frozen=True)
class Ref:
    """``"module:attr"``, imported when needed (a default that lives in a heavy module)."""

    target: str

    def get(self) -> Any:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Flags:
    """The fields of one config dataclass that a command shows as flags, and how.

    ``only``/``exclude`` pick fields; ``defaults``, ``helps``, ``names`` and
    ``panels`` and ``panel`` adjust them for this command (a field without
    metadata is a flag when ``helps`` names it); ``parse`` maps a field to
    ``(flag type, function)`` where the flag's value is not the field's (a
    comma list for a tuple); a ``None`` from such a flag keeps the field's
    default.
    """

    cls: str | type
    only: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    helps: dict[str, str] = field(default_factory=dict)
    panels: dict[str, str] = field(default_factory=dict)
    names: dict[str, str | tuple[str, ...]] = field(default_factory=dict)
    panel: str | None = None
    parse: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def resolve(self) -> type:
        return Ref(self.cls).get() if isinstance(self.cls, str) else self.cls

    def fields(self) -> list:
        picked = [f for f in dataclasses.fields(self.resolve()) if f.init and (CLI_META in f.metadata or f.name in self.helps) and f.name not in self.exclude]
        if self.only is not None:
            by_name = {f.name: f for f in dataclasses.fields(self.resolve())}
            picked = [by_name[name] for name in self.only if name not in self.exclude]  # in the command's order
        return picked

    def parameters(self, group: str) -> list[tuple[str, Any, Any]]:
        """(parameter name, typer OptionInfo, type) per flag; names are ``group__field``."""
        import typer  # the command line only: this module serves the library too

        hints = typing.get_type_hints(self.resolve())
        out = []
        for f in self.fields():
            meta: CliFlag = f.metadata.get(CLI_META) or CliFlag("")
            if f.name in self.defaults:
                default = self.defaults[f.name]
                default = default.get() if isinstance(default, Ref) else default
            else:
                default = f.default if f.default is not MISSING else f.default_factory() if f.default_factory is not MISSING else ...
            kind = hints[f.name]
            if f.name in self.parse:
                kind = self.parse[f.name][0]
                if isinstance(default, tuple):  # a tuple's flag is a comma list; an empty one is the flag left out
                    default = ",".join(map(str, default)) or None
            kind = _optional(kind)
            decls = self.names.get(f.name) or meta.flag or "--" + f.name.replace("_", "-")
            decls = (decls,) if isinstance(decls, str) else tuple(decls)
            info = typer.Option(default, *decls, help=self.helps.get(f.name, meta.help), rich_help_panel=self.panels.get(f.name, meta.panel or self.panel), hidden=meta.hidden)
            out.append((f"{group}__{f.name}", info, kind))
        return out

    def build(self, values: dict[str, Any]) -> Any:
        """The dataclass from the parsed flag values (it validates itself)."""
        kw = {}
        for name, value in values.items():
            if name in self.parse:
                if value is None:
                    continue
                value = self.parse[name][1](value)
            kw[name] = value
        return self.resolve()(**kw)


def _optional(kind: Any) -> Any:
    """``X | None`` as ``Optional[X]``, the spelling typer reads."""
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        return typing.Optional[rest[0]] if len(rest) == 1 else kind
    return kind


def typer_app(name: str, help: str, plugins: str | None = None):
    """A command line's top-level typer app, the same for ``dataprep`` and ``softrepa``.

    ``plugins``: an entry-point group whose commands join the app (see
    :func:`plugin_commands`), looked up only when click lists the commands
    (``--help``) or meets a name the app does not have, so ``dataprep caption
    ...`` never pays for reading package metadata.
    """
    import typer

    cls = _plugin_group_class(plugins) if plugins else None
    return typer.Typer(name=name, help=help, no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_enable=False, cls=cls)


def config_exit(message: str, code: int = 2):
    """Print a configuration error (its flag and fix are in the message); the typer.Exit to raise."""
    import typer

    print_error(message)
    return typer.Exit(code)


def with_config(**groups: Flags):
    """Make a typer command whose keyword arguments ``groups`` arrive as built config dataclasses.

    The groups' flags join the command's own (:func:`register` adds it to an
    app). A ConfigError, from a dataclass or from the command, prints one
    line and exits 2 (``dataprep.errors``), also where the app runs without
    ``run_cli`` (tests, ``python -m``).
    """

    def decorate(fn):
        @functools.wraps(fn)
        def command(**kwargs):
            values = _FLAG_VALUES.get()
            try:
                for group, flags in groups.items():
                    prefix = group + "__"
                    kwargs[group] = flags.build({k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)})
                return fn(**kwargs)
            except ConfigError as exc:
                raise config_exit(str(exc)) from None

        sig = inspect.signature(fn, eval_str=True)  # typer needs real annotations, not strings
        # the groups are not the command's own flags (a **groups catch-all may take them)
        own = [p for p in sig.parameters.values() if p.name not in groups and p.kind is not p.VAR_KEYWORD]
        command.__signature__ = sig.replace(parameters=own)
        setattr(command, _GROUPS_ATTR, groups)
        return command

    return decorate


def register(typer_app: Any, name: str, command: Any) -> Any:
    """Add ``command`` to ``typer_app`` as ``name``; one made by :func:`with_config` gets its flag groups."""
    return typer_app.command(name, cls=_config_command_class() if hasattr(command, _GROUPS_ATTR) else None)(command)


def config_command(typer_app: Any, name: str, **groups: Flags):
    """:func:`with_config` and :func:`register` in one decorator."""
    return lambda fn: register(typer_app, name, with_config(**groups)(fn))


def plugin_commands(group: str) -> dict[str, Any]:
    """name -> command function of each entry point in ``group``.

    How a package adds a command to a command line it may not import (flows'
    ``dataprep serve`` and ``softrepa recipe``). Only this distribution's own
    metadata is read (scanning every installed distribution would cost about
    50 ms), every copy of it on sys.path: a checkout's stale *.egg-info found
    first must not hide the installed entry points.
    """
    from importlib import metadata  # ~20 ms: only a command line listing its commands pays it

    found: dict[str, Any] = {}
    for dist in metadata.distributions(name="softrepa-dataprep"):
        for ep in dist.entry_points.select(group=group):
            found.setdefault(ep.name, ep)
    return {name: ep.load() for name, ep in found.items()}


def _plugin_group_class(group: str) -> type:
    """typer's group class, with the commands of the entry-point ``group`` added on first need."""
    import typer

    class PluginGroup(typer.core.TyperGroup):
        _plugins: dict[str, Any] | None = None

        def _plugin_commands(self) -> dict[str, Any]:
            if self._plugins is None:
                self._plugins = {}
                for name, fn in plugin_commands(group).items():
                    one = typer.Typer(add_completion=False)
                    register(one, name, fn)
                    self._plugins[name] = typer.main.get_command(one)
            return self._plugins

        def list_commands(self, ctx: Any) -> list[str]:
            own = super().list_commands(ctx)
            return own + [n for n in self._plugin_commands() if n not in own]

        def get_command(self, ctx: Any, name: str) -> Any:
            return super().get_command(ctx, name) or self._plugin_commands().get(name)

    return PluginGroup


@functools.cache
def _config_command_class() -> type:
    """typer's command class, with the groups' flags added when click first asks for the parameters."""
    import typer  # the command line only: this module serves the library too

    class ConfigCommand(typer.core.TyperCommand):
        _added: list[str] | None = None

        def _add_flags(self) -> list[str]:
            if self._added is None:
                self._added = []
                for group, flags in getattr(self.callback, _GROUPS_ATTR, {}).items():
                    for name, info, kind in flags.parameters(group):
                        # typer.main._get_param: the converter typer uses for a signature's parameters
                        self.params.append(typer.main._get_param(typer.models.ParamMeta(name=name, default=info, annotation=kind)))
                        self._added.append(name)
            return self._added

        def get_params(self, ctx):
            self._add_flags()
            return super().get_params(ctx)

        def invoke(self, ctx):
            # the groups' values travel beside the command's own arguments
            token = _FLAG_VALUES.set({name: ctx.params.pop(name) for name in self._add_flags() if name in ctx.params})
            try:
                return super().invoke(ctx)
            finally:
                _FLAG_VALUES.reset(token)

    return ConfigCommand


# help texts of the flags several stages share, written once
SEED_HELP = "Random seed for sampling (part of the row key)."
TOP_P_HELP = "Nucleus sampling when --temperature > 0."
MAX_NEW_TOKENS_HELP = "Generation budget per request; rows that hit it get finish_reason=length."
FORCE_HELP = "Recompute rows that already exist (default: skip keys with a good row, retry failed ones)."
ROWS_PER_SHARD_HELP = "Rows per Parquet shard; a killed run loses at most one shard."
RETRY_TEMPERATURE_HELP = "Sampling temperature of retries (attempt k uses seed --seed + k - 1)."


def wait_lock_help(store: str) -> str:
    return f"If another run is writing OUT/{store}, wait for it to finish (default: stop at once, exit 2, naming it)."


@dataclass(frozen=True)
class StageOptions:
    """What every model stage's options share (caption, rewrite, judge): the seed, --force and the shard size.

    A stage's own fields follow these; its ``__post_init__`` calls this one.
    """

    seed: int = option(0, SEED_HELP, panel="Sampling")
    force: bool = option(False, FORCE_HELP, panel="Run")
    rows_per_shard: int = option(256, ROWS_PER_SHARD_HELP, panel="Run")

    def __post_init__(self) -> None:
        at_least(self.rows_per_shard, 1, "--rows-per-shard", "e.g. 256")  # else the shard writer fails after the model loaded
