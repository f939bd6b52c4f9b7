"""Oracle tests: the Hugging Face export (M2M100 for a pre-norm model, FSMT for a post-norm one)
computes what `mt` computes (logits, greedy and beam outputs), and CTranslate2 on the converted weights
translates like `mt`. Every test runs on a pre-norm and a post-norm run.

Skipped only when the optional extra (`pip install 'mt[export]'`) is missing; `make test` installs it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mt.config import config_from_dict
from mt.batch import pad
from mt.search import beam_search, greedy_search
from mt.tokenizer import BOS_ID, EOS_ID, PAD_ID
from mt.train import train
from mt.run import Run
from tolerance import score_slack

transformers = pytest.importorskip("transformers", reason="the optional extra mt[export] is not installed")
ctranslate2 = pytest.importorskip("ctranslate2", reason="the optional extra mt[export] is not installed")

from mt.export import ExportError, to_ctranslate2, to_hf  # noqa: E402


@pytest.fixture(scope="module", params=["pre", "post"])
def run_dir(request, tmp_path_factory, multi30k_head) -> Path:
    """A small de->en run (model.norm pre or post) trained in-test long enough that its outputs end
    with </s> on every CPU: after 200 steps all 200 beam outputs below end before 40 tokens under
    ATEN_CPU_CAPABILITY=default, avx2 and avx512, 1 or 2 threads (after 100 steps 180-181: too close
    to any floor)."""
    tmp = tmp_path_factory.mktemp(f"export_{request.param}")
    for lang in ("de", "en"):
        (tmp / f"train.{lang}").write_text("\n".join(multi30k_head("train", lang, 4000)) + "\n", encoding="utf-8")
    cfg = config_from_dict({
        "data": {"train": {"src": str(tmp / "train.de"), "tgt": str(tmp / "train.en")}, "max_len": 64,
                 "cache_dir": str(tmp / "cache")},
        "tokenizer": {"vocab_size": 500},
        "model": {"d_model": 64, "n_heads": 4, "ffn_dim": 128, "encoder_layers": 2, "decoder_layers": 2,
                  "dropout": 0.0, "max_positions": 256, "norm": request.param},
        "train": {"run_dir": str(tmp / "run"), "max_steps": 200, "valid_every": 200, "max_tokens": 2048,
                  "lr": 3e-3, "warmup_steps": 20, "num_threads": 0},
        "decode": {"beam": 5, "lenpen": 1.0},
    })
    train(cfg, log=lambda _: None, progress=False)
    return tmp / "run"


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = to_hf(run_dir, tmp_path_factory.mktemp("hf") / "model")
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    model, cfg, src_tok, tgt_tok = Run(run_dir).load_for_inference(device="cpu")
    return out, hf, model, src_tok, tgt_tok


@pytest.fixture(scope="module")
def test_sources(multi30k_head, exported) -> list[list[int]]:
    _, _, _, src_tok, _ = exported
    return src_tok.encode(multi30k_head("test_2016_flickr", "de", 48))


def test_export_directory_loads_offline_as_m2m100_or_fsmt(exported):
    out, hf, model, _, _ = exported
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "generation_config.json",
                                               "sentencepiece.model"}
    assert hf.config.decoder_start_token_id == BOS_ID and hf.config.pad_token_id == PAD_ID
    embed = hf.model.decoder.embed_tokens.weight
    assert hf.model.encoder.embed_tokens.weight.data_ptr() == embed.data_ptr()  # one embedding, as in mt
    if model.cfg.norm == "pre":
        assert isinstance(hf, transformers.M2M100ForConditionalGeneration)
        assert hf.lm_head.weight.data_ptr() == embed.data_ptr()
        positions = hf.model.encoder.embed_positions.weights
    else:
        assert isinstance(hf, transformers.FSMTForConditionalGeneration)
        assert hf.model.decoder.output_projection.weight.data_ptr() == embed.data_ptr()
        positions = hf.model.encoder.embed_positions.weight
    assert torch.equal(positions[: len(model.positions)], model.positions)  # the same sinusoidal table
    trained = [p for name, p in hf.named_parameters() if "embed_positions" not in name]  # FSMT's are parameters
    assert sum(p.numel() for p in trained) == model.num_parameters()


def test_hf_logits_equal_mt_logits(exported, test_sources, multi30k_head):
    _, hf, model, _, tgt_tok = exported
    src = pad(test_sources[:16])
    tgt = tgt_tok.encode(multi30k_head("test_2016_flickr", "en", 16))
    tgt_in = pad([[BOS_ID] + t[:-1] for t in tgt])
    with torch.no_grad():
        ours = model(src, tgt_in)
        theirs = hf(input_ids=src, attention_mask=(src != PAD_ID).long(), decoder_input_ids=tgt_in).logits
    real = tgt_in != PAD_ID
    assert (ours - theirs)[real].abs().max().item() < 1e-4


def _hf_generate(hf, src: torch.Tensor, **kwargs) -> list[list[int]]:
    with torch.no_grad():
        out = hf.generate(input_ids=src, attention_mask=(src != PAD_ID).long(), do_sample=False,
                          bad_words_ids=[[BOS_ID], [PAD_ID]], **kwargs)
    result = []
    for row in out.tolist():
        row = row[1:]  # the decoder start token
        result.append(row[: row.index(EOS_ID) + 1] if EOS_ID in row else [t for t in row if t != PAD_ID])
    return result


def _mt_log_probs(model, src: list[int], tokens: list[int]) -> torch.Tensor:
    """(len(tokens), V) log-probabilities under mt of each next token, teacher-forced on ``tokens``."""
    with torch.no_grad():
        logits = model(torch.tensor([src]), torch.tensor([[BOS_ID] + tokens[:-1]]))
    return torch.log_softmax(logits[0].float(), dim=-1)


def _mt_score(model, src: list[int], tokens: list[int], lenpen: float) -> float:
    """mt's ranking score of an output ``tokens`` (</s> included): log p / len**lenpen."""
    lprobs = _mt_log_probs(model, src, tokens)
    return lprobs[torch.arange(len(tokens)), torch.tensor(tokens)].sum().item() / len(tokens) ** lenpen


def _assert_near_tie(model, src: list[int], ours: list[int], theirs: list[int], lenpen: float) -> None:
    """Two engines' different beam outputs (</s> included) must score the same under mt, to rounding:
    a near-tie that another CPU's summation order decided the other way. A clearly better hypothesis
    missed by either side fails."""
    mine, other = _mt_score(model, src, ours, lenpen), _mt_score(model, src, theirs, lenpen)
    assert abs(mine - other) <= score_slack(mine, max(len(ours), len(theirs))), \
        f"mt {ours} scores {mine:.6f} under mt, the other engine's {theirs} {other:.6f}"


def test_hf_greedy_outputs_equal_mt_greedy(exported, test_sources):
    _, hf, model, _, _ = exported
    src = pad(test_sources)
    limit = 40
    ours = [h.tokens + [EOS_ID] for h in greedy_search(model, src, max_len_a=0.0, max_len_b=limit)]
    theirs = _hf_generate(hf, src, num_beams=1, max_new_tokens=limit)
    for ids, o, t in zip(test_sources, ours, theirs):
        # compared up to the limit: there mt ends a hypothesis with </s> and HF just stops
        n = min(len(o), len(t), limit - 1)
        differ = [j for j in range(n) if o[j] != t[j]]
        if not differ:
            assert len(o) == len(t) or n == limit - 1, f"one ends, the other goes on: {o} vs {t}"
            continue
        # greedy outputs part at a step where both tokens are (to rounding) equally probable under mt
        j = differ[0]
        lprobs = _mt_log_probs(model, ids, o)[j]
        assert lprobs[o[j]].item() == pytest.approx(lprobs[t[j]].item(), rel=0, abs=score_slack(0.0, 1)), \
            f"step {j}: mt chose {o[j]}, HF {t[j]}"
    assert sum(t[-1] == EOS_ID for t in theirs) >= len(theirs) // 4  # the check is not only about limits


@pytest.mark.parametrize("lenpen", [1.0, 0.6])
def test_hf_beam_outputs_equal_mt_beam_with_the_same_length_penalty(exported, test_sources, lenpen):
    _, hf, model, _, _ = exported
    src = pad(test_sources)
    limit = 40
    ours = [h[0].tokens + [EOS_ID] for h in beam_search(model, src, beam=5, lenpen=lenpen, max_len_a=0.0,
                                                        max_len_b=limit)]
    theirs = _hf_generate(hf, src, num_beams=5, length_penalty=lenpen, early_stopping=True, max_new_tokens=limit)
    finished = [i for i, t in enumerate(theirs) if t[-1] == EOS_ID and len(t) < limit]
    assert len(finished) >= 0.75 * len(theirs)  # the check is not only about limits
    for i, (o, t) in enumerate(zip(ours, theirs)):
        if i not in finished:  # cut at the limit: mt ends it with </s>, HF just stops
            assert o[: limit - 1] == t[: limit - 1]
        elif o != t:
            _assert_near_tie(model, test_sources[i], o, t, lenpen)


@pytest.mark.parametrize("beam", [1, 5])
def test_autotokenizer_and_generate_give_mt_translate_outputs(exported, run_dir, multi30k_head, beam):
    """What a transformers user does with the export (README): AutoTokenizer, generate, batch_decode."""
    from mt.translate import Translator

    out, hf, model, src_tok, tgt_tok = exported
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, len(tok)) == (BOS_ID, PAD_ID, EOS_ID, src_tok.vocab_size)
    lines = multi30k_head("test_2016_flickr", "de", 48) + ["  Ein  Hund rennt …  ", "Ein Hund und 猫."]
    batch = tok(lines, return_tensors="pt", padding=True)
    ids = src_tok.encode(lines)  # </s> appended, no language code
    assert batch["input_ids"].tolist() == pad(ids).tolist()
    assert batch["attention_mask"].tolist() == (pad(ids) != PAD_ID).long().tolist()
    limit = 40
    with torch.no_grad():
        generated = hf.generate(**batch, num_beams=beam, max_new_tokens=limit, bad_words_ids=[[BOS_ID], [PAD_ID]])
    theirs = tok.batch_decode(generated, skip_special_tokens=True)
    translator = Translator.from_run(run_dir, device="cpu", beam=beam, greedy=beam == 1, max_len_a=0.0,
                                     max_len_b=limit)
    ours = [t.hypotheses[0] for t in translator.translate(lines)]
    texts = [" ".join(t.split()) for t in tgt_tok.decode([h.tokens for h in ours])]
    assert [t.texts[0] for t in translator.translate(lines)] == texts
    ended = [i for i, row in enumerate(generated.tolist()) if EOS_ID in row[1:] and len(ours[i].tokens) < limit - 1]
    assert len(ended) >= (0.25 if beam == 1 else 0.75) * len(lines)  # greedy repeats itself more often
    same = [i for i in ended if theirs[i] == texts[i]]
    assert len(same) >= 0.9 * len(ended)
    for i in set(ended) - set(same):  # a near-tie decided the other way, as in the beam test above
        other = generated[i].tolist()[1:]
        other = other[: other.index(EOS_ID) + 1]
        _assert_near_tie(model, ids[i], ours[i].tokens + [EOS_ID], other, translator.decode.lenpen)


def test_ctranslate2_float32_agrees_with_mt(run_dir, tmp_path, multi30k_head):
    out = to_ctranslate2(run_dir, tmp_path / "ct2")
    model, _, src_tok, tgt_tok = Run(run_dir).load_for_inference(device="cpu")
    lines = multi30k_head("test_2016_flickr", "de", 200)
    ids = src_tok.encode(lines)
    limit = 40
    ours = [h[0].tokens for h in beam_search(model, pad(ids), beam=5, lenpen=1.0, max_len_a=0.0, max_len_b=limit)]
    translator = ctranslate2.Translator(str(out), device="cpu", compute_type="float32", intra_threads=torch.get_num_threads())
    pieces = [[src_tok.sp.id_to_piece(i) for i in seq] for seq in ids]
    results = translator.translate_batch(pieces, beam_size=5, length_penalty=1.0, max_decoding_length=limit - 1)
    theirs = [[tgt_tok.sp.piece_to_id(p) for p in r.hypotheses[0]] for r in results]
    # mt ends a hypothesis at the length limit with </s>; CTranslate2 cuts it, and the last step's
    # choice then differs by design: compare those that end
    ended = [i for i in range(len(lines)) if max(len(ours[i]), len(theirs[i])) < limit - 1]
    assert len(ended) >= 0.9 * len(lines)
    for i in ended:
        if ours[i] != theirs[i]:
            _assert_near_tie(model, ids[i], ours[i] + [EOS_ID], theirs[i] + [EOS_ID], lenpen=1.0)
    assert sum(ours[i] == theirs[i] for i in ended) >= 0.9 * len(ended)  # near-ties are rare


def test_separate_vocabularies_are_refused(tmp_path, run_dir):
    import shutil

    import yaml

    from mt import checkpoint as ckpt

    for section, key, value, message in (("tokenizer", "joint", False, "only joint vocabularies"),
                                          ("model", "share_embeddings", False, "only joint vocabularies")):
        bad = tmp_path / f"{key}"
        shutil.copytree(run_dir, bad)
        state = ckpt.load(bad / "checkpoints" / "best.pt")
        state["config"][section][key] = value
        ckpt.atomic_save(state, bad / "checkpoints" / "best.pt")
        with pytest.raises(ExportError, match=message):
            to_hf(bad, tmp_path / f"out_{key}")
        assert not (tmp_path / f"out_{key}").exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["share_embeddings"] is True


def test_export_refuses_a_non_empty_output_directory(run_dir, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "precious.txt").write_text("keep me")
    for export in (to_hf, to_ctranslate2):
        with pytest.raises(ExportError, match="not an empty directory"):
            export(run_dir, taken)
    assert (taken / "precious.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match="--quantization 'int3'"):
        to_ctranslate2(run_dir, tmp_path / "new", quantization="int3")
