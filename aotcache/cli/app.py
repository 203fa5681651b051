"""The ``aotcache`` click group: global options, configuration checks and the error policy.

Subcommands live in their own modules (``store_commands``, later the graph and eager caches) and are
attached in :mod:`aotcache.cli`. NOTE [fast start]: nothing here, nor in any store subcommand, imports
torch; ``aotcache info`` reads torch's version from package metadata instead.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from aotcache import config

__all__ = ["CliState", "CliError", "ConfigProblem", "cli", "json_option", "state", "interactive",
           "confirm_or_refuse"]


class CliError(click.ClickException):
    """A user-facing failure: printed as one ``aotcache: error: ...`` line on stderr, exit code 1."""

    exit_code = 1

    def show(self, file=None) -> None:  # noqa: D401 - click's hook
        click.echo(f"aotcache: error: {self.format_message()}", err=True)


class ConfigProblem(CliError):
    """A bad ``AOTCACHE_*`` variable or option value: one line naming it, exit code 2 (like a usage error)."""

    exit_code = 2


@dataclass
class CliState:
    """Per-invocation settings shared by every subcommand (``ctx.obj``)."""

    as_json: bool = False


def state() -> CliState:
    """The current invocation's :class:`CliState`."""
    ctx = click.get_current_context()
    obj = ctx.find_object(CliState)
    if obj is None:  # a subcommand invoked on its own (tests); use defaults
        obj = ctx.ensure_object(CliState)
    return obj


def json_option(function):
    """The ``--json`` flag, shared by every subcommand (also accepted before the subcommand)."""

    def remember(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        if value:
            ctx.ensure_object(CliState).as_json = True
        return value

    return click.option("--json", "as_json", is_flag=True, expose_value=False, callback=remember,
                        help="Print machine-readable JSON on stdout (and nothing else).")(function)


def interactive() -> bool:
    """Whether stdin is a terminal (a person who can answer a confirmation prompt)."""
    stdin = sys.stdin
    return stdin is not None and hasattr(stdin, "isatty") and stdin.isatty()


def confirm_or_refuse(question: str, what: str, *, yes: bool) -> None:
    """Ask ``question`` on a terminal unless ``yes``; refuse when stdin is not interactive (scripts, CI).

    :raises CliError: not confirmed, or not interactive without ``--yes`` (``what`` names what was refused).
    """
    if yes:
        return
    if not interactive():
        raise CliError(f"refusing to {what} without confirmation: stdin is not interactive; pass --yes to "
                       "do it anyway")
    if not click.confirm(question, default=False, err=True):
        raise CliError("nothing removed")


def _check_environment() -> None:
    """Parse every option now so that a bad env var fails here, in one line, rather than mid-command.

    Unknown ``AOTCACHE_*`` variables (likely typos) are a warning on stderr, not an error.
    """
    problems = []
    for name in config.options():
        try:
            config.get(name)
        except config.ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigProblem("; ".join(problems))
    known = set(config.iter_env_vars())
    for var in sorted(os.environ):
        if var.startswith("AOTCACHE_") and var not in known:
            click.echo(f"aotcache: warning: {var} is not an aotcache option and is ignored", err=True)


class _Group(click.Group):
    """A click group that turns configuration errors raised anywhere into :class:`ConfigProblem`."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except config.ConfigError as exc:
            raise ConfigProblem(str(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache directory for this invocation (overrides AOTCACHE_CACHE_DIR).")
@click.option("--redis-url", default=None, metavar="URL",
              help="Redis tier for this invocation, e.g. redis://host:6379/0 (overrides AOTCACHE_REDIS_URL).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout for every subcommand.")
@click.version_option(package_name="aotcache", prog_name="aotcache")
@click.pass_context
def cli(ctx: click.Context, cache_dir: Path | None, redis_url: str | None, as_json: bool) -> None:
    """Inspect and maintain the aotcache compilation cache (memory -> disk -> Redis tiers)."""
    overrides: dict[str, object] = {}
    if cache_dir is not None:
        overrides["cache_dir"] = cache_dir
    if redis_url is not None:
        overrides["redis_url"] = redis_url
    if overrides:
        ctx.with_resource(config.patch(overrides))
    obj = ctx.ensure_object(CliState)
    obj.as_json = obj.as_json or as_json
    _check_environment()


