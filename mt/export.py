"""Export a run to Hugging Face transformers and CTranslate2.

A pre-norm model (``model.norm=pre``, the default) is M2M100's architecture one-to-one
(``M2M100ForConditionalGeneration``, see ``mt/model.py``); a post-norm one (``model.norm=post``) is
fairseq's Transformer, which transformers ports as FSMT (``FSMTForConditionalGeneration``: LayerNorm
after each sub-layer, no final LayerNorm, fairseq's sinusoidal table with positions from
``padding_idx + 1``, exactly ours). Either way the export only renames and splits tensors: our packed
attention projection [W_q; W_k; W_v] becomes ``q_proj``, ``k_proj``, ``v_proj``; our ``Sublayer``
norms become ``self_attn_layer_norm``, ``encoder_attn_layer_norm`` and ``final_layer_norm``; the
shared embedding becomes every embedding and the tied output projection. The decoder starts from
``<s>`` (id 0), so ``decoder_start_token_id`` = 0.

CTranslate2 converts M2M100 itself; for FSMT, which it has no loader for, ``_fsmt_loader`` gives it one
(its BART loader with post-norm layers, no embedding LayerNorm and FSMT's module names).

Not exportable: separate vocabularies, untied embeddings (``model.share_embeddings=false``). M2M100
has one embedding for both sides and the output; FSMT could hold two, but the export keeps one.

Needs the optional extra ``mt[export]`` (transformers, safetensors; ctranslate2 for ``--to ctranslate2``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from mt import checkpoint as ckpt
from mt.config import Config, config_from_dict
from mt.errors import MtError
from mt.files import atomic_copy, atomic_write
from mt.run import Run
from mt.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, WORD_START, Tokenizer


class ExportError(MtError):
    """The run cannot be exported; the message says which setting prevents it."""


def _require(module: str, package: str = ""):
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(f"exporting needs the '{package or module}' package: pip install 'mt[export]'") from None


def check_exportable(cfg: Config, src_vocab: int, tgt_vocab: int) -> None:
    if not cfg.model.share_embeddings or not cfg.tokenizer.joint or src_vocab != tgt_vocab:
        raise ExportError("only joint vocabularies with model.share_embeddings=true can be exported "
                          "(the export shares one embedding between encoder, decoder and output)")


def _check_out_dir(out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir}: exists and is not an empty directory; choose a new one")


def _shape(cfg: Config) -> dict:
    """The config keys M2M100 and FSMT share, from our model shape and special ids."""
    m = cfg.model
    return dict(
        d_model=m.d_model, max_position_embeddings=m.max_positions,
        encoder_layers=m.encoder_layers, decoder_layers=m.decoder_layers,
        encoder_attention_heads=m.n_heads, decoder_attention_heads=m.n_heads,
        encoder_ffn_dim=m.ffn_dim, decoder_ffn_dim=m.ffn_dim, activation_function=m.activation,
        dropout=m.dropout, attention_dropout=m.attention_dropout, activation_dropout=m.activation_dropout,
        encoder_layerdrop=0.0, decoder_layerdrop=0.0, scale_embedding=m.scale_embedding,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, decoder_start_token_id=BOS_ID,
        tie_word_embeddings=True,
    )


def hf_config(cfg: Config, vocab: int):
    """The ``M2M100Config`` of our model shape (pre-norm, whatever ``model.norm`` says: the training
    benchmark's peer)."""
    transformers = _require("transformers")
    return transformers.M2M100Config(vocab_size=vocab, architectures=["M2M100ForConditionalGeneration"],
                                     **_shape(cfg))


def fsmt_config(cfg: Config, vocab: int):
    """The ``FSMTConfig`` of our post-norm model shape: fairseq's Transformer as transformers ports it."""
    transformers = _require("transformers")
    return transformers.FSMTConfig(
        langs=[cfg.data.src_lang, cfg.data.tgt_lang], src_vocab_size=vocab, tgt_vocab_size=vocab,
        max_length=cfg.model.max_positions, architectures=["FSMTForConditionalGeneration"],
        use_cache=False,  # FSMT drops the causal mask from a forward with the cache on; generate() still uses it
        **_shape(cfg),
    )


def hf_model(cfg: Config, vocab: int):
    """A randomly initialised transformers model of our architecture: M2M100 (pre-norm) or FSMT (post-norm)."""
    transformers = _require("transformers")
    if cfg.model.norm == "pre":
        return transformers.M2M100ForConditionalGeneration(hf_config(cfg, vocab))
    return transformers.FSMTForConditionalGeneration(fsmt_config(cfg, vocab))


def hf_state_dict(state: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    """Our parameter names and shapes -> M2M100ForConditionalGeneration's (pre-norm) or
    FSMTForConditionalGeneration's (post-norm)."""
    D = cfg.model.d_model
    pre = cfg.model.norm == "pre"
    out = {}

    def attention(ours: str, theirs: str) -> None:
        weight, bias = state[f"{ours}.in_proj.weight"], state[f"{ours}.in_proj.bias"]
        for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{theirs}.{name}.weight"] = weight[i * D: (i + 1) * D].clone()
            out[f"{theirs}.{name}.bias"] = bias[i * D: (i + 1) * D].clone()
        out[f"{theirs}.out_proj.weight"] = state[f"{ours}.out_proj.weight"]
        out[f"{theirs}.out_proj.bias"] = state[f"{ours}.out_proj.bias"]

    def copy(ours: str, theirs: str) -> None:
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = state[f"{ours}.{p}"]

    embedding = state["tgt_embed.weight"]
    tied = ("model.shared.weight", "lm_head.weight") if pre else ("model.decoder.output_projection.weight",)
    for name in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight") + tied:
        out[name] = embedding
    for i in range(cfg.model.encoder_layers):
        ours, theirs = f"encoder_layers.{i}", f"model.encoder.layers.{i}"
        attention(f"{ours}.self_attn", f"{theirs}.self_attn")
        copy(f"{ours}.attn_block.norm", f"{theirs}.self_attn_layer_norm")
        copy(f"{ours}.ffn_block.norm", f"{theirs}.final_layer_norm")
        copy(f"{ours}.ffn.fc1", f"{theirs}.fc1")
        copy(f"{ours}.ffn.fc2", f"{theirs}.fc2")
    for i in range(cfg.model.decoder_layers):
        ours, theirs = f"decoder_layers.{i}", f"model.decoder.layers.{i}"
        attention(f"{ours}.self_attn", f"{theirs}.self_attn")
        attention(f"{ours}.cross_attn", f"{theirs}.encoder_attn")
        copy(f"{ours}.self_block.norm", f"{theirs}.self_attn_layer_norm")
        copy(f"{ours}.cross_block.norm", f"{theirs}.encoder_attn_layer_norm")
        copy(f"{ours}.ffn_block.norm", f"{theirs}.final_layer_norm")
        copy(f"{ours}.ffn.fc1", f"{theirs}.fc1")
        copy(f"{ours}.ffn.fc2", f"{theirs}.fc2")
    if pre:  # post-norm has no final LayerNorm
        copy("encoder_norm", "model.encoder.layer_norm")
        copy("decoder_norm", "model.decoder.layer_norm")
    return out


def to_hf(run_dir: str | Path, out_dir: str | Path, checkpoint: str | None = None, average: int = 0) -> Path:
    """Write ``out_dir`` loadable offline with ``AutoModelForSeq2SeqLM.from_pretrained(out_dir)``.
    ``checkpoint`` None: the run's tuned choice (RUN/decode.yaml), else best; so are beam and lenpen."""
    transformers = _require("transformers")
    _check_out_dir(out_dir)
    run = Run(run_dir)
    tuned = run.read_defaults()
    checkpoint = checkpoint or tuned.get("checkpoint", "best")
    state = ckpt.load(run.resolve(checkpoint))  # check the settings before building anything
    check_exportable(config_from_dict(state["config"]), state["vocab"]["src"], state["vocab"]["tgt"])
    model, cfg, src_tok, tgt_tok = run.load_for_inference(checkpoint, "fp32", "cpu", average)
    spm_path = run.tokenizer_paths(joint=True)[0]
    tokenizer_files = hf_tokenizer(spm_path, cfg.model.max_positions)  # one that cannot be made stops us here
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = hf_model(cfg, tgt_tok.vocab_size)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model.state_dict(), cfg), strict=False)
    missing = [k for k in missing if "embed_positions" not in k]
    if missing or unexpected:  # a mapping bug, never a user error
        raise RuntimeError(f"export mapping incomplete: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    d = replace(cfg.decode, **{k: v for k, v in tuned.items() if k in ("beam", "lenpen")})
    hf.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=BOS_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        num_beams=d.beam, length_penalty=d.lenpen, early_stopping=True, max_length=cfg.model.max_positions,
        use_cache=True,  # FSMT's config turns it off for forward() (fsmt_config)
    )
    hf.save_pretrained(out_dir, safe_serialization=True)
    atomic_copy(spm_path, out_dir / "sentencepiece.model")
    for name, text in tokenizer_files.items():
        with atomic_write(out_dir / name) as f:
            f.write(text)
    record = {"source": str(run_dir), "checkpoint": checkpoint, "average": average,
              "special_ids": {"bos": BOS_ID, "pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID},
              "decode": {"beam": d.beam, "lenpen": d.lenpen, "max_len_a": d.max_len_a, "max_len_b": d.max_len_b}}
    with atomic_write(out_dir / "mt_export.json") as f:
        f.write(json.dumps(record, indent=1) + "\n")
    return out_dir


def hf_tokenizer(spm_path: Path, max_length: int) -> dict[str, str]:
    """``tokenizer.json`` and ``tokenizer_config.json`` (name -> text) for ``AutoTokenizer``: our
    SentencePiece model as a ``tokenizers`` pipeline that encodes and decodes as ``mt`` does
    (SentencePiece's normalisation table, its pieces and scores, ``</s>`` appended, no language codes;
    ids < 3 are special and skipped on decoding, ``<unk>`` decodes to " ⁇ " as SentencePiece's)."""
    _require("tokenizers")
    _require("google.protobuf", "protobuf")  # what sentencepiece_model_pb2 reads the model with
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, decoders, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE, Unigram

    proto = sentencepiece_model_pb2.ModelProto.FromString(spm_path.read_bytes())
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    names = [p.piece for p in proto.pieces]
    normal_pieces = [p.type for p in proto.pieces[4:]] == [1] * (len(names) - 4)  # no user-defined or byte pieces
    if (names[:4] != ["<s>", "<pad>", "</s>", "<unk>"] or trainer.byte_fallback or not normal_pieces
            or not (norm.add_dummy_prefix and norm.remove_extra_whitespaces and norm.escape_whitespaces)
            or trainer.treat_whitespace_as_suffix or proto.denormalizer_spec.precompiled_charsmap):
        raise ExportError(f"{spm_path}: SentencePiece options the Hugging Face tokenizer cannot reproduce "
                          "(train it with mt tokenizer train)")
    if trainer.model_type == 1:  # unigram: the same pieces, ids and scores
        model = Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=UNK_ID, byte_fallback=False)
    elif trainer.model_type == 2:  # bpe: each merge ranked by the score of the piece it makes
        rank = {p.piece: (-p.score, i) for i, p in enumerate(proto.pieces) if p.type == 1}
        merges = sorted((rank[t], t[:k], t[k:]) for t in rank for k in range(1, len(t)) if t[:k] in rank and t[k:] in rank)
        model = BPE({n: i for i, n in enumerate(names)}, [(a, b) for _, a, b in merges], unk_token="<unk>",
                    fuse_unk=True, byte_fallback=False)
    else:
        raise ExportError(f"{spm_path}: only unigram and bpe SentencePiece models can be exported")
    tok = HFTokenizer(model)
    steps = [normalizers.Precompiled(norm.precompiled_charsmap)] if norm.precompiled_charsmap else []
    tok.normalizer = normalizers.Sequence(steps + [  # SentencePiece's own order
        normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " "),
        normalizers.Replace(" ", WORD_START), normalizers.Prepend(WORD_START)])
    unk_surface = trainer.unk_surface if trainer.HasField("unk_surface") else " \u2047 "
    tok.decoder = decoders.Sequence([decoders.Replace(Regex(r"\A<unk>\z"), unk_surface), decoders.Fuse(),
                                     decoders.Strip(content=WORD_START, left=1 << 20, right=0),
                                     decoders.Replace(WORD_START, " ")])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<s>", "<pad>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", EOS_ID)])
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                "pad_token": "<pad>", "unk_token": None, "padding_side": "right", "truncation_side": "right",
                "clean_up_tokenization_spaces": False, "split_special_tokens": True, "model_max_length": max_length,
                "model_input_names": ["input_ids", "attention_mask"]}
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(settings, indent=1) + "\n"}


class _Vocabulary:
    """What CTranslate2's M2M100 loader reads from a tokenizer, taken from our SentencePiece model
    (the converter would otherwise load M2M100's tokenizer, whose language codes lie beyond our vocabulary)."""

    bos_token, eos_token, unk_token, pad_token = "<s>", "</s>", "<unk>", "<pad>"
    unk_token_id = UNK_ID
    special_tokens_map: dict = {}
    num_madeup_words = 0

    def __init__(self, tokenizer: Tokenizer):
        self.pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]

    def get_vocab(self) -> dict[str, int]:
        return {piece: i for i, piece in enumerate(self.pieces)}

    def convert_ids_to_tokens(self, index: int) -> str:
        return self.pieces[index]


def _fsmt_loader():
    """A CTranslate2 loader for ``FSMTForConditionalGeneration``: its BART loader (the same layer and
    module names) with post-norm layers, no embedding LayerNorm, FSMT's output projection, and the
    sinusoidal table from position ``padding_idx + 1`` on (CTranslate2 counts positions from 0)."""
    from ctranslate2.converters import transformers as ct2
    from ctranslate2.specs import transformer_spec

    class FSMTLoader(ct2.BartLoader):
        @property
        def architecture_name(self) -> str:
            return "FSMTForConditionalGeneration"

        def get_model_spec(self, model):
            c = model.config
            spec = transformer_spec.TransformerSpec.from_config(
                (c.encoder_layers, c.decoder_layers), c.encoder_attention_heads, pre_norm=False,
                activation=ct2._SUPPORTED_ACTIVATIONS[c.activation_function], layernorm_embedding=False)
            self.set_encoder(spec.encoder, model.model.encoder)
            self.set_decoder(spec.decoder, model.model.decoder)
            self.set_linear(spec.decoder.projection, model.model.decoder.output_projection)
            return spec

        def set_position_encodings(self, spec, module):
            spec.encodings = module.weight[module.padding_idx + 1:]

    return FSMTLoader


def to_ctranslate2(run_dir: str | Path, out_dir: str | Path, checkpoint: str | None = None, average: int = 0,
                   quantization: str | None = None) -> Path:
    """Convert through the HF export with CTranslate2's own ``TransformersConverter`` (and, for a
    post-norm model, our FSMT loader registered with it: CTranslate2 has none)."""
    ctranslate2 = _require("ctranslate2")
    import tempfile

    from ctranslate2.converters import transformers as ct2

    if "FSMTConfig" not in getattr(ct2, "_MODEL_LOADERS", {}):
        ct2.register_loader("FSMTConfig")(_fsmt_loader())

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return _Vocabulary(Tokenizer(Path(model_name_or_path) / "sentencepiece.model"))

    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    if quantization and quantization not in ctranslate2.specs.model_spec.ACCEPTED_MODEL_TYPES:
        raise ExportError(f"--quantization {quantization!r}: choose one of "
                          f"{', '.join(ctranslate2.specs.model_spec.ACCEPTED_MODEL_TYPES)}")
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = to_hf(run_dir, Path(tmp) / "hf", checkpoint, average)
        # force=True lets the converter replace out_dir, which was checked to be new or empty above
        Converter(str(hf_dir)).convert(str(out_dir), quantization=quantization, force=True)
        atomic_copy(hf_dir / "sentencepiece.model", out_dir / "sentencepiece.model")
    return out_dir
