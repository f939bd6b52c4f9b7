"""The ``mt`` command line: a thin Typer layer over the library.

Each command parses its options and calls one library function. User errors (bad config, bad corpus,
unreadable checkpoint...) print one line on stderr and exit with status 1; ``--debug`` or
``MT_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="mt",
    help="Train Transformer translation models on parallel text; translate and evaluate from the shell.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
tokenizer_app = typer.Typer(help="SentencePiece tokenizers.", no_args_is_help=True)
data_app = typer.Typer(help="Get corpora.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(data_app, name="data")

_state = {"debug": os.environ.get("MT_DEBUG", "") not in ("", "0")}


def _user_errors() -> tuple[type[Exception], ...]:
    from mt.checkpoint import CheckpointError
    from mt.config import ConfigError
    from mt.data import CorpusError
    from mt.multi30k import DataFetchError
    from mt.tokenizer import TokenizerError
    from mt.train import TrainingError

    return ConfigError, CorpusError, TokenizerError, CheckpointError, TrainingError, DataFetchError, OSError


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"mt: error: {message}", err=True)
    raise typer.Exit(code)


def _log(message: str) -> None:
    typer.echo(message, err=True)


def _message(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)


def _handles_errors(fn):
    """Turn user errors raised by the library into one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as e:
            if _state["debug"]:
                raise
            _fail(_message(e))
        except KeyboardInterrupt:
            _fail("interrupted", code=130)

    return wrapper


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors (also MT_DEBUG=1).")] = False):
    if debug:
        _state["debug"] = True


@app.command()
@_handles_errors
def train(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config (optional with --resume: the run's config.yaml).")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Overrides as section.key=value, e.g. train.max_steps=100.", show_default=False)] = None,
    run_dir: Annotated[Optional[Path], typer.Option("-o", "--run-dir", help="Run directory (default: train.run_dir of the config).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in the run directory from checkpoints/last.pt.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Train a model: tokenizer (when the config names none), data, training, checkpoints.

    The run directory receives config.yaml (fully resolved), the SentencePiece model(s),
    checkpoints/ (last.pt, best.pt, step_N.pt) and metrics.jsonl.
    """
    from mt.config import load_config
    from mt.train import train as run_training

    overrides = list(overrides or [])
    if config is not None and "=" in str(config) and not config.exists():
        overrides.insert(0, str(config))
        config = None
    if config is None:
        if not (resume and run_dir is not None):
            _fail("give a config file (or --resume with -o RUN_DIR to use the run's config.yaml)")
        config = run_dir / "config.yaml"
    if run_dir is not None:
        overrides.append(f"train.run_dir={run_dir}")
    cfg = load_config(config, overrides)
    result = run_training(cfg, resume=resume, log=_log, progress=False if quiet else None)
    _log(f"run directory: {result.run_dir}")


@tokenizer_app.command("train")
@_handles_errors
def tokenizer_train(
    inputs: Annotated[list[Path], typer.Argument(help="Text files (one sentence per line, .gz allowed).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the SentencePiece model (.model).")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Vocabulary size, special tokens included.")] = 8000,
    model_type: Annotated[str, typer.Option("--type", help="unigram or bpe.")] = "unigram",
    character_coverage: Annotated[float, typer.Option("--character-coverage", help="Share of characters covered.")] = 1.0,
    input_sentence_size: Annotated[int, typer.Option("--input-sentence-size", help="Sample this many sentences (shuffled); 0: all.")] = 2_000_000,
):
    """Train a SentencePiece model on text files (ids: <s>=0 <pad>=1 </s>=2 <unk>=3).

    Give files of both languages for a joint vocabulary.
    """
    from mt.config import TokenizerConfig
    from mt.data import read_lines
    from mt.tokenizer import train_sentencepiece

    TokenizerConfig(type=model_type, vocab_size=vocab_size, character_coverage=character_coverage)  # validates

    def lines():
        for path in inputs:
            yield from read_lines(path)

    train_sentencepiece(lines(), output, vocab_size=vocab_size, model_type=model_type,
                        character_coverage=character_coverage, input_sentence_size=input_sentence_size)
    _log(f"wrote {output}")


@data_app.command("multi30k")
@_handles_errors
def data_multi30k(
    dest: Annotated[Path, typer.Argument(help="Directory to fill with {train,val,test_2016_flickr}.{de,en,fr,cs}.gz.")] = Path("data/multi30k"),
    source: Annotated[Optional[Path], typer.Option("--from", envvar="MULTI30K_DIR", help="Copy from this local directory instead of downloading (env MULTI30K_DIR).")] = None,
):
    """Get the Multi30k corpus (task 1, raw): copied from a local directory or downloaded."""
    from mt.multi30k import fetch

    fetch(dest, source or None, log=_log)
    _log(f"Multi30k ready in {dest}")


def main() -> None:
    app()
