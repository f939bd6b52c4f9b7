"""The ``mt`` command line: a thin Typer layer over the library.

Each command parses its options and calls one library function. User errors (bad config, bad corpus,
unreadable checkpoint...) print one line on stderr and exit with status 1; ``--debug`` or
``MT_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="mt",
    help="Train Transformer translation models on parallel text; translate and evaluate from the shell.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
tokenizer_app = typer.Typer(help="SentencePiece tokenizers.", no_args_is_help=True)
data_app = typer.Typer(help="Get corpora; tokenize them into the cache.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(data_app, name="data")

_state = {"debug": os.environ.get("MT_DEBUG", "") not in ("", "0")}


def _user_errors() -> tuple[type[Exception], ...]:
    from mt.errors import MtError

    return (MtError, OSError)


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
            from mt.distributed import DistributedError

            if isinstance(e, DistributedError):  # another rank failed, and rank 0 says why: one line per run
                raise typer.Exit(1)
            _fail(_message(e))
        except KeyboardInterrupt:
            _fail("interrupted", code=130)

    return wrapper


def _print_version(value: bool) -> None:
    if value:
        from mt import __version__

        typer.echo(f"mt {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors (also MT_DEBUG=1).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print mt's version and exit.")] = False,
):
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
    nproc: Annotated[int, typer.Option("--nproc", help="Train with N processes on this machine (DDP; one per GPU, or CPU cores shared out); for several machines run torchrun -m mt train.")] = 1,
):
    """Train a model: tokenizer (when the config names none), data, training, checkpoints.

    The run directory receives config.yaml (fully resolved), the SentencePiece model(s),
    checkpoints/ (last.pt, best.pt, step_N.pt) and metrics.jsonl.
    """
    from mt.config import load_config
    from mt.distributed import launch, launched
    from mt.train import train as run_training

    if nproc < 1:
        _fail(f"--nproc {nproc}: must be at least 1")
    if nproc > 1 and not launched():
        argv = ([str(config)] if config is not None else []) + list(overrides or [])
        argv += (["-o", str(run_dir)] if run_dir is not None else []) + (["--resume"] if resume else [])
        if config is not None and "=" not in str(config):
            load_config(config, list(overrides or []))  # a bad config fails here, once, not once per rank
        raise typer.Exit(launch(nproc, argv + (["-q"] if quiet else [])))
    overrides = list(overrides or [])
    if config is not None and "=" in str(config) and not config.exists():
        overrides.insert(0, str(config))
        config = None
    if config is None:
        if not (resume and run_dir is not None):
            _fail("give a config file (or --resume with -o RUN_DIR to use the run's config.yaml)")
        from mt.run import Run

        config = Run(run_dir).config_path
    if run_dir is not None:
        overrides.append(f"train.run_dir={json.dumps(str(run_dir))}")  # literal, not YAML-parsed
    cfg = load_config(config, overrides)
    result = run_training(cfg, resume=resume, log=_log, progress=False if quiet else None)
    if os.environ.get("RANK", "0") == "0":
        _log(f"run directory: {result.run_dir}")
    if result.signal:
        raise typer.Exit(128 + result.signal)


@tokenizer_app.command("train")
@_handles_errors
def tokenizer_train(
    inputs: Annotated[list[Path], typer.Argument(help="Text files (one sentence per line, .gz allowed).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the SentencePiece model (.model).")],
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Vocabulary size, special tokens included.")] = 8000,
    model_type: Annotated[str, typer.Option("--type", help="unigram or bpe.")] = "unigram",
    character_coverage: Annotated[float, typer.Option("--character-coverage", help="Share of characters covered.")] = 1.0,
    input_sentence_size: Annotated[int, typer.Option("--input-sentence-size", help="Train on a seeded uniform sample of this many sentences; 0: all.")] = 2_000_000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample (the same files and seed give the same model).")] = 1,
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
                        character_coverage=character_coverage, input_sentence_size=input_sentence_size, seed=seed)
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


@data_app.command("prepare")
@_handles_errors
def data_prepare(
    config: Annotated[Path, typer.Argument(help="YAML config naming the corpora and tokenizer.src_model.")],
    overrides: Annotated[Optional[list[str]], typer.Argument(help="Overrides as section.key=value.", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Tokenize a config's training and validation corpora into the cache (data.cache_dir), once.

    Every run with the same corpus files and tokenizer then reads the cache instead of tokenizing:
    ids in 16 bits for vocabularies up to 65,536 pieces, no copy of the text.
    """
    from mt.config import load_config
    from mt.prepare import prepare_caches

    prepare_caches(load_config(config, list(overrides or [])), log=_log, progress=False if quiet else None)


# Decoding options shared by translate and eval; None means "the run's". Their help is the config's
# own documentation (mt/config.py, DecodeConfig).
def _decode_help(key: str) -> str:
    from mt.config import DecodeConfig, field_docs

    tuned = "chosen on validation (RUN/decode.yaml), else " if key in ("beam", "lenpen") else ""
    return f"{field_docs(DecodeConfig)[key]} Default: the run's: {tuned}decode.{key} of its config."


Beam = Annotated[Optional[int], typer.Option("--beam", "-b", help=_decode_help("beam"))]
Lenpen = Annotated[Optional[float], typer.Option("--lenpen", help=_decode_help("lenpen"))]
MaxLenA = Annotated[Optional[float], typer.Option("--max-len-a", help=_decode_help("max_len_a"))]
MaxLenB = Annotated[Optional[int], typer.Option("--max-len-b", help=_decode_help("max_len_b"))]
MinLen = Annotated[Optional[int], typer.Option("--min-len", help=_decode_help("min_len"))]
BatchTokens = Annotated[Optional[int], typer.Option("--batch-tokens", help=_decode_help("batch_tokens"))]
Greedy = Annotated[bool, typer.Option("--greedy", help="Greedy search instead of beam search.")]
Checkpoint = Annotated[Optional[str], typer.Option("--checkpoint", "-c", help="best, last, average, a step number or a file (default: the one chosen on validation, else best).")]
Average = Annotated[int, typer.Option("--average", help="Average the weights of the last N (>= 2) step checkpoints instead of --checkpoint.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Dtype = Annotated[Optional[str], typer.Option("--dtype", help=_decode_help("dtype"))]
RunDir = Annotated[Path, typer.Option("--model", "-m", help="Run directory written by mt train.")]


def _translator(run_dir, checkpoint, average, device, greedy, nbest, beam, lenpen, max_len_a, max_len_b,
                min_len, batch_tokens, dtype, align=False, align_layer=None):
    from mt.translate import Translator

    if nbest > 1 and greedy:
        _fail("--nbest needs beam search; drop --greedy")
    return Translator.from_run(run_dir, checkpoint=checkpoint, average=average, device=device, greedy=greedy,
                               nbest=nbest, align=align, align_layer=align_layer, beam=beam, lenpen=lenpen,
                               max_len_a=max_len_a,
                               max_len_b=max_len_b, min_len=min_len, batch_tokens=batch_tokens, dtype=dtype)


def _input_lines(stream, name: str):
    """Lines of a binary stream split on \\n only; invalid UTF-8 is replaced, with a warning."""
    for lineno, raw in enumerate(stream, start=1):
        raw = raw.rstrip(b"\n").rstrip(b"\r")
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            _log(f"mt: warning: {name}:{lineno}: invalid UTF-8 at byte {e.start}, replaced with U+FFFD")
            yield raw.decode("utf-8", errors="replace")


@app.command()
@_handles_errors
def translate(
    model: RunDir,
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help="Input file (default: stdin).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output file (default: stdout).")] = None,
    checkpoint: Checkpoint = None,
    average: Average = 0,
    beam: Beam = None,
    lenpen: Lenpen = None,
    max_len_a: MaxLenA = None,
    max_len_b: MaxLenB = None,
    min_len: MinLen = None,
    nbest: Annotated[int, typer.Option("--nbest", help="Print the N best as index<TAB>score<TAB>hypothesis.")] = 1,
    scores: Annotated[bool, typer.Option("--scores", help="Print score<TAB>hypothesis.")] = False,
    align: Annotated[bool, typer.Option("--align", help="Append <TAB>word alignments: source-target word index pairs (0-based, words split on spaces), as fairseq's --print-alignment.")] = False,
    align_layer: Annotated[Optional[int], typer.Option("--align-layer", help="With --align: align with this decoder layer's cross-attention alone (1-based). Default: all layers and heads averaged, which aligned best on hand-annotated Multi30k (see README).")] = None,
    batch_tokens: BatchTokens = None,
    greedy: Greedy = False,
    device: Device = "auto",
    dtype: Dtype = None,
):
    """Translate lines from stdin (or -i) to stdout (or -o): one output line per input line, in order.

    Empty input lines give empty output lines. Scores are length-normalised log-probabilities.
    """
    import contextlib
    import io
    import sys

    from mt.attention import format_links
    from mt.files import atomic_write
    from mt.progress import bar as progress_bar
    from mt.translate import LineStream

    if align_layer is not None and not align:
        _fail("--align-layer needs --align")
    if align_layer is not None and align_layer < 1:
        _fail(f"--align-layer {align_layer}: layers count from 1")
    translator = _translator(model, checkpoint, average, device, greedy, nbest, beam, lenpen, max_len_a,
                             max_len_b, min_len, batch_tokens, dtype,
                             align=align, align_layer=None if align_layer is None else align_layer - 1)

    def links(result, k: int) -> str:
        return "\t" + format_links(result.alignments[k] if result.alignments else []) if align else ""

    with contextlib.ExitStack() as stack:
        if input is None:
            source, name = sys.stdin.buffer, "<stdin>"
        else:
            try:
                source, name = stack.enter_context(open(input, "rb")), str(input)
            except OSError as e:
                _fail(f"{input}: cannot open ({e.strerror})")
        try:  # a real file or pipe: read lines as they come, and answer each pause in the input at once
            lines = LineStream(source.fileno())
            ready = lines.ready
        except (OSError, ValueError, io.UnsupportedOperation):  # an in-memory stream (tests, library use)
            lines, ready = source, None
        if output is None:
            sink = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="\n", write_through=True)
        else:  # appears only when complete
            sink = stack.enter_context(atomic_write(output))
        bar = stack.enter_context(progress_bar(None, unit=" lines", leave=False))
        try:
            _write_translations(translator.translate(_input_lines(lines, name), ready), sink, bar, nbest=nbest,
                                scores=scores, links=links, flush=output is None)
        except BrokenPipeError:  # the reader went away (mt translate | head -1): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
            raise typer.Exit(128 + 13)  # what a process ended by SIGPIPE reports
        if output is None:
            sink.detach()


def _write_translations(results, sink, bar, *, nbest: int, scores: bool, links, flush: bool) -> None:
    """One line per input line (N lines with --nbest N); with ``flush``, each as soon as it exists."""
    for index, result in enumerate(results):
        if nbest > 1:
            hyps = result.hypotheses or [None] * nbest
            texts = result.texts if result.hypotheses else [""] * nbest
            for k, (hyp, text) in enumerate(zip(hyps, texts)):
                sink.write(f"{index}\t{hyp.score if hyp else 0.0:.4f}\t{text}{links(result, k)}\n")
        elif scores:
            hyp = result.hypotheses[0] if result.hypotheses else None
            sink.write(f"{hyp.score if hyp else 0.0:.4f}\t{result.texts[0]}{links(result, 0)}\n")
        else:
            sink.write(result.texts[0] + links(result, 0) + "\n")
        bar.update(1)
        if flush:
            sink.flush()
    sink.flush()


@app.command("eval")
@_handles_errors
def evaluate(
    ref: Annotated[list[Path], typer.Option("--ref", "-r", help="Reference translations, one per line; repeat for several references.")],
    system: Annotated[Optional[list[Path]], typer.Option("--sys", "-s", help="System output (default: stdin); repeat to compare systems, the first the baseline.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Translate --src with this run first (one more system).")] = None,
    src: Annotated[Optional[Path], typer.Option("--src", help="Source file to translate (with -m).")] = None,
    language_pair: Annotated[Optional[str], typer.Option("--language-pair", "-l", help="SRC-TGT, e.g. en-zh: BLEU tokenizes as the target language needs (zh, ja-mecab, ko-mecab; else 13a), as sacrebleu -l. Default with -m: the run's data.src_lang-data.tgt_lang.")] = None,
    metrics: Annotated[str, typer.Option("--metrics", help="Comma-separated: bleu, chrf, ter.")] = "bleu,chrf,ter",
    paired_bs: Annotated[bool, typer.Option("--paired-bs", help="Compare the systems with the first by paired bootstrap resampling (sacrebleu --paired-bs).")] = False,
    paired_bs_n: Annotated[int, typer.Option("--paired-bs-n", help="Bootstrap resamples for --paired-bs.")] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (sacreBLEU's fields).")] = False,
    width: Annotated[int, typer.Option("--width", "-w", help="Decimals, as sacrebleu -w.")] = 1,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="With -m: also write the translations here.")] = None,
    checkpoint: Checkpoint = None,
    average: Average = 0,
    beam: Beam = None,
    lenpen: Lenpen = None,
    max_len_a: MaxLenA = None,
    max_len_b: MaxLenB = None,
    min_len: MinLen = None,
    batch_tokens: BatchTokens = None,
    greedy: Greedy = False,
    device: Device = "auto",
    dtype: Dtype = None,
):
    """Score translations with sacreBLEU (BLEU, chrF, TER with signatures).

    Score a system output (-s FILE or stdin) against -r REF (several -r: several references), or
    translate --src with -m RUN first; several systems (-s A -s B, or -s A -m RUN) print a table,
    with --paired-bs a significance test against the first. The numbers equal the sacrebleu command
    line's on the same files.
    """
    import json
    import sys

    from mt.evaluate import compare, decode_lines, parse_metrics, read_text, score
    from mt.files import atomic_write

    names = parse_metrics(metrics)
    tgt_lang = ""
    if language_pair is not None:
        parts = language_pair.split("-")
        if len(parts) != 2 or not all(parts):
            _fail(f"--language-pair {language_pair!r}: give SRC-TGT, e.g. de-en")
        tgt_lang = parts[1]
    references = [read_text(path) for path in ref]
    systems = [(str(path), read_text(path)) for path in system or []]
    if model is not None:
        if src is None:
            _fail("-m needs --src (the source side to translate)")
        translator = _translator(model, checkpoint, average, device, greedy, 1, beam, lenpen, max_len_a,
                                 max_len_b, min_len, batch_tokens, dtype)
        if language_pair is None:
            from mt.run import Run

            tgt_lang = Run(model).load_config().data.tgt_lang
        hypotheses = translator.translate_lines(read_text(src))
        if output is not None:
            with atomic_write(output) as f:
                f.write("".join(h + "\n" for h in hypotheses))
        systems.append((str(model), hypotheses))
    elif not systems:
        systems.append(("<stdin>", decode_lines(sys.stdin.buffer.read().split(b"\n"), "<stdin>")))
    if len(systems) > 1 or paired_bs:
        typer.echo(compare(systems, references, names, paired_bs=paired_bs, samples=paired_bs_n, width=width,
                           tgt_lang=tgt_lang, as_json=as_json), nl=False)
        return
    results = score(systems[0][1], references, names, width=width, tgt_lang=tgt_lang)
    if as_json:
        typer.echo(json.dumps([r.as_dict() for r in results], indent=1))
    else:
        for r in results:
            typer.echo(r.text)


@app.command()
@_handles_errors
def average(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by mt train.")],
    last: Annotated[int, typer.Option("--last", help="Average the last N step checkpoints.")] = 0,
    best: Annotated[int, typer.Option("--best", help="Average the N step checkpoints with the best validation score.")] = 0,
    metric: Annotated[Optional[str], typer.Option("--metric", help="With --best: bleu or nll (default: the run's train.best_metric).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Checkpoint to write (default: RUN/checkpoints/average_lastN.pt or average_bestN.pt).")] = None,
):
    """Average the weights of several checkpoints of a run into one (translate with it: -c FILE).

    Step checkpoints only exist for the steps the run kept (train.keep_checkpoints); checkpoints
    written without validation (train.save_every) have no score for --best.
    """
    from mt.run import Run

    if bool(last) == bool(best):
        _fail("give exactly one of --last N or --best N")
    if metric is not None and metric not in ("bleu", "nll"):
        _fail(f"--metric {metric!r}: choose bleu or nll")
    run = Run(run_dir)
    if last:
        path = run.average_last(last, output or run.average_name("last", last))
    else:
        path = run.average_best(best, metric or run.load_config().train.best_metric,
                                output or run.average_name("best", best))
    _log(f"averaged {last or best} checkpoints -> {path}")


@app.command()
@_handles_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by mt train.")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to write.")],
    to: Annotated[str, typer.Option("--to", help="hf (transformers: M2M100, FSMT for model.norm=post) "
                                                 "or ctranslate2.")] = "hf",
    checkpoint: Checkpoint = None,
    average: Average = 0,
    quantization: Annotated[Optional[str], typer.Option("--quantization", help="ctranslate2 only: int8, int8_float32, bfloat16...")] = None,
):
    """Export a run to Hugging Face transformers or CTranslate2 (needs: pip install 'mt[export]').

    --to hf writes model.safetensors, config.json, generation_config.json and the SentencePiece
    model, loadable offline with AutoModelForSeq2SeqLM.from_pretrained(OUT_DIR).
    """
    from mt.export import to_ctranslate2, to_hf

    if to == "hf":
        if quantization:
            _fail("--quantization applies to --to ctranslate2 only")
        to_hf(run_dir, out_dir, checkpoint, average)
    elif to == "ctranslate2":
        to_ctranslate2(run_dir, out_dir, checkpoint, average, quantization)
    else:
        _fail(f"--to {to!r}: choose hf or ctranslate2")
    _log(f"exported {run_dir} to {out_dir} ({to})")


@app.command()
@_handles_errors
def attention(
    model: RunDir,
    src: Annotated[str, typer.Option("--src", help="The source sentence.")],
    tgt: Annotated[Optional[str], typer.Option("--tgt", help="A target sentence to force through the decoder (default: the model's own translation).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Picture to write (.png, .pdf, .svg).")] = None,
    kind: Annotated[str, typer.Option("--kind", help="cross (target x source), self-enc or self-dec.")] = "cross",
    heads: Annotated[bool, typer.Option("--heads", help="One panel per head (a layers x heads grid) instead of heads averaged.")] = False,
    layer: Annotated[Optional[list[int]], typer.Option("--layer", help="Only this layer (1-based; repeat for several). Default: all.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the weights as JSON (every layer and head) instead of, or besides, -o.")] = False,
    checkpoint: Checkpoint = None,
    beam: Beam = None,
    device: Device = "auto",
):
    """Show attention for one sentence: heatmaps of every layer, axes labelled with the pieces.

    Cross-attention rows are the output pieces (each predicted after the ones above it), columns the
    source pieces; the weights are softmax(QK^T/sqrt(d)) of a teacher-forced pass, fp32.
    """
    import json

    from mt.attention import KINDS, inspect
    from mt.translate import Translator

    if kind not in KINDS:
        _fail(f"--kind {kind!r}: choose {', '.join(KINDS)}")
    if output is None and not as_json:
        _fail("give -o PICTURE.png, --json, or both")
    if output is not None:
        from mt.plot import pyplot

        pyplot()  # matplotlib missing: say so before loading the model
    translator = Translator.from_run(model, checkpoint=checkpoint, device=device, beam=beam, dtype="fp32")

    def own_translation(text: str):
        result = next(translator.translate([text]))
        return result.hypotheses[0].tokens, result.texts[0]

    seen = inspect(translator.model, translator.src_tok, translator.tgt_tok, src, tgt, own_translation, kinds=[kind])
    maps = seen.maps[kind]
    count = len(maps.layers)
    for n in layer or []:
        if not 1 <= n <= count:
            _fail(f"--layer {n}: the model has {count} layers of {kind} attention (1..{count})")
    chosen = [n - 1 for n in layer] if layer else None
    if as_json:
        data = maps.as_dict()
        data["layer_numbers"] = [i + 1 for i in (chosen if chosen is not None else range(count))]
        if chosen is not None:
            data["layers"] = [data["layers"][i] for i in chosen]
        typer.echo(json.dumps({"source": seen.source, "target": seen.target, **data}))
    if output is not None:
        from mt.plot import attention_figure

        attention_figure(maps, output, heads=heads, layers=chosen, title=f"{seen.source}\n→ {seen.target}")
        _log(f"wrote {output}")


@app.command()
@_handles_errors
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (several: overlaid).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Picture to write (.png, .pdf, .svg).")] = Path("curves.png"),
):
    """Learning curves from metrics.jsonl: training and validation loss, validation BLEU and learning
    rate, against updates and against training time; several runs overlaid."""
    from mt.plot import curves_figure, pyplot
    from mt.run import Run, RunError

    pyplot()
    series = []
    for path in runs:
        run = Run(path)
        if not run.metrics_path.is_file():
            raise RunError(f"{run.metrics_path}: no such file (not a run directory written by mt train?)")
        series.append((str(path), run.metrics_rows()))
    for warning in curves_figure(series, output):
        _log(f"mt: warning: {warning}")
    _log(f"wrote {output}")


@app.command()
@_handles_errors
def info(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by mt train.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """What a run holds (model, vocabulary, corpora, updates, best validation scores, decoding
    defaults) and what this machine supports (CUDA, native bf16, int8)."""
    import json

    from mt.info import describe, format_info

    facts = describe(run_dir)
    typer.echo(json.dumps(facts, indent=1) if as_json else format_info(facts))


def main() -> None:
    from mt.allocator import keep_freed_memory

    keep_freed_memory()
    app()
