"""CLIP tokenisation: the bundled OpenAI BPE, and a tokenizer carried over from a transformers folder."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from convert.to_flax import convert_to_flax
from convert.to_torch import convert_to_torch
from mmovseg_jax.models import clip, storage, tokenizer
from mmovseg_jax.models import params as P

from conftest import RELEASE_FIXTURE

FIXTURE = RELEASE_FIXTURE
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def bundled() -> tokenizer.Tokenizer:
    return tokenizer.Tokenizer()


def test_bundled_bpe_known_ids(bundled):
    ids = bundled(["A photo of a farmland in the scene", "water"])
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    want = [SOT, 320, 1125, 539, 320, 45258, 530, 518, 3562, EOT]
    assert ids[0, :10].tolist() == want
    assert (ids[0, 10:] == EOT).all()  # padded with the end token
    assert ids[1, 0] == SOT and ids[1, 2] == EOT and (ids[1, 3:] == EOT).all()
    assert bundled("A photo of a farmland in the scene").shape == (1, 77)
    assert bundled.eos_token_id == EOT
    assert tokenizer.Tokenizer(context_length=12)(["a"]).shape == (1, 12)


def test_bundled_bpe_truncates_long_text(bundled):
    ids = bundled([" ".join(["forest"] * 200)])
    assert ids.shape == (1, 77) and ids[0, 0] == SOT


@pytest.mark.skipif(not (FIXTURE / "fixture.npz").is_file(), reason="release fixture not present")
def test_bundled_bpe_matches_release_fixture(bundled):
    manifest = json.loads((FIXTURE / "manifest.json").read_text())
    with np.load(FIXTURE / "fixture.npz") as z:
        official = z["clip/tokens"]
    ours = bundled([manifest["template"].format(c) for c in manifest["classes"]])
    assert ours.shape == official.shape
    for row, ref in zip(ours, official):
        n = int(np.argmax(ref == EOT)) + 1  # through the end token
        assert ref[n - 1] == EOT
        np.testing.assert_array_equal(row[:n], ref[:n])
        assert (ref[n:] == 0).all() and (row[n:] == EOT).all()  # OpenAI pads with 0, transformers with EOT


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer files"):
        tokenizer.load(tmp_path)


# ------------------------------------------------ a trained tokenizer travels along

SENTENCES = ["A photo of a farmland in the scene", "A photo of a city in the scene",
             "a road, a forest and the water.", "Satellite images of rivers!"]


def train_clip_bpe(folder: Path, sentences=SENTENCES, vocab_size: int = 330) -> dict[str, int]:
    """Trains a byte-level BPE the way CLIPTokenizer applies one (lower-casing, CLIP's word split,
    `</w>` word ends) and writes vocab.json / merges.txt with the two special tokens last, as in
    OpenAI's vocabulary."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    tok = Tokenizer(BPE(unk_token=specials[1], end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    split = Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(split, behavior="removed", invert=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=specials, end_of_word_suffix="</w>",
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sentences, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))  # vocab.json, merges.txt
    vocab = json.loads((folder / "vocab.json").read_text())
    ordinary = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in specials]
    vocab = {t: i for i, t in enumerate(ordinary + specials)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    assert (folder / "merges.txt").read_text().count("\n") > 10  # some merges were learnt
    return vocab


def test_trained_tokenizer_travels_with_hf_clip(tmp_path):
    src = tmp_path / "hf"
    vocab = train_clip_bpe(src)
    v = len(vocab)
    assert vocab["<|endoftext|>"] == v - 1
    cfg = CLIPConfig(
        projection_dim=16,
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=16, patch_size=8),
        text_config=dict(vocab_size=v, max_position_embeddings=16, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=128, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]))
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(src)

    out = convert_to_flax(src, tmp_path / "flax")
    for name in ("vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    tok = tokenizer.load(out, context_length=16)
    assert tok.eos_token_id == v - 1
    ids = tok(SENTENCES)
    assert ids.shape == (len(SENTENCES), 16) and ids.dtype == np.int32
    assert (ids[:, 0] == v - 2).all()
    # Every word is in the trained vocabulary: the first end token ends the text (no unknowns).
    lengths = np.argmax(ids == v - 1, axis=1)
    assert lengths.tolist() == [9, 9, 10, 6]
    assert tok.tokenizer.convert_ids_to_tokens(ids[0, 1:9].tolist())[-4:] == ["farmland</w>", "in</w>", "the</w>",
                                                                            "scene</w>"]

    ours = clip.load(out)
    assert ours.config.text.pooling == "eos" and ours.config.text.eos_token_id == v - 1
    with torch.no_grad():
        ref = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    ref = (ref.pooler_output if hasattr(ref, "pooler_output") else ref).numpy()
    np.testing.assert_allclose(np.asarray(ours.encode_text(jnp.asarray(ids))), ref, atol=1e-4, rtol=0)

    # and back: the transformers folder carries the same tokenizer files
    back = convert_to_torch(out, tmp_path / "back", format="hf")
    for name in ("vocab.json", "merges.txt"):
        assert (back / name).read_bytes() == (src / name).read_bytes()


def test_openai_conversion_carries_bundled_bpe(tmp_path):
    cfg = clip.Config(
        vision=clip.VisionConfig(patch_size=8, width=64, depth=1, num_heads=1, mlp_dim=128, image_size=16),
        text=clip.TextConfig(vocab_size=100, context_length=8, width=64, depth=1, num_heads=1, mlp_dim=128,
                             eos_token_id=99, pooling="argmax"),
        embed_dim=8)
    shapes = P.param_shapes_of(storage.build_abstract("clip", cfg))
    params = {k: np.full(shape, 0.5, np.float32) for k, (shape, _) in shapes.items()}
    folder = storage.save(tmp_path / "made", "clip", cfg, params, source={})
    pth = convert_to_torch(folder, tmp_path / "openai.pth", format="openai", qkv="split")
    out = convert_to_flax(pth, tmp_path / "flax")
    for name in ("vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (tokenizer.BUNDLED_BPE / name).read_bytes()
    # (the tiny model's vocabulary is smaller; only the stored tokenizer is checked here)
    ids = tokenizer.load(out, context_length=8)(["a photo of a farmland"])
    assert ids[0].tolist() == [SOT, 320, 1125, 539, 320, 45258, EOT, EOT]
