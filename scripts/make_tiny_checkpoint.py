#!/usr/bin/env python3
"""Write a tiny Hugging Face-format decoder checkpoint with seeded random weights.

The output directory gets ``config.json``, ``generation_config.json`` and
``model.safetensors``, which is enough for ``vllm.LLM(model=DIR,
skip_tokenizer_init=True)`` with token-id prompts. Nothing is downloaded.

``--tokenizer`` also writes a small real tokenizer beside the weights (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``), so that vLLM, its server and its
benchmark client load it as they load any model's: a byte-level BPE trained with the
``tokenizers`` package (a dependency of vLLM and transformers) on a seeded synthetic
text (:func:`synthetic_text`), ``--tokenizer-vocab`` entries, specials ``<pad>`` = 0,
``<s>`` = 1 (bos), ``</s>`` = 2 (eos). The model's vocabulary may be larger (real
checkpoints pad theirs too): the embedding and lm_head rows of the ids the tokenizer does
not have are zero, so greedy decoding never picks one (their logit is 0, below the
largest of the others).

``--preset`` gives the width of a real model (:data:`PRESETS`: hidden, intermediate,
heads, KV heads, head size, vocabulary, tied embeddings, rope theta) with random
weights; its depth is the real one unless ``--num-layers`` says otherwise. Any explicit
size option overrides the preset's.

Architectures: Qwen3ForCausalLM (per-head q_norm/k_norm), LlamaForCausalLM,
MistralForCausalLM and Qwen2ForCausalLM (q/k/v bias).

``--w8a8`` writes a compressed-tensors int8 W8A8 checkpoint instead: every Linear in the
decoder layers (q/k/v/o, gate/up/down) is stored as a per-output-channel symmetric int8
``weight`` [N, K] with an fp32 ``weight_scale`` [N, 1]. Activations are int8, either
dynamic per token (``--act dynamic``) or static per tensor (``--act static``, which also
writes an fp32 ``input_scale`` [1] for each quantized linear). Embeddings, norms and
lm_head are left in the float dtype.

Only torch and safetensors are needed (and ``tokenizers`` for ``--tokenizer``).

Example:
    python scripts/make_tiny_checkpoint.py /tmp/tiny-qwen3 --arch qwen3
    python scripts/make_tiny_checkpoint.py /tmp/tiny-qwen3-w8a8 --arch qwen3 --w8a8 --act static
    python scripts/make_tiny_checkpoint.py /tmp/qwen3-0.6b-w-4l --preset qwen3-0.6b \
        --num-layers 4 --tokenizer
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

ARCHS = {
    # name: (architectures entry, model_type, qkv bias, per-head q/k norm)
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False, True),
    "llama": ("LlamaForCausalLM", "llama", False, False),
    "mistral": ("MistralForCausalLM", "mistral", False, False),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", True, False),
}

# Real models' widths (random weights here). "num_layers" is the real depth (the default
# of --num-layers with the preset); "vocab_size" the real vocabulary (padded beyond the
# trained tokenizer's entries, see --tokenizer).
PRESETS = {
    "qwen3-0.6b": {"arch": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
                   "num_heads": 16, "num_kv_heads": 8, "head_dim": 128,
                   "vocab_size": 151936, "num_layers": 28, "max_position_embeddings": 40960,
                   "rope_theta": 1000000.0, "tie_word_embeddings": True},
    "llama-3.2-1b": {"arch": "llama", "hidden_size": 2048, "intermediate_size": 8192,
                     "num_heads": 32, "num_kv_heads": 8, "head_dim": 64,
                     "vocab_size": 128256, "num_layers": 16,
                     "max_position_embeddings": 131072, "rope_theta": 500000.0,
                     "tie_word_embeddings": True, "rms_norm_eps": 1e-5},
}
# Without a preset (the tiny checkpoints of the tests).
BASE_DEFAULTS = {"arch": "qwen3", "hidden_size": 128, "intermediate_size": 256,
                 "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": None,
                 "vocab_size": 512, "max_position_embeddings": 512, "rope_theta": 10000.0,
                 "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: config's bos 1 and eos 2
DEFAULT_TOKENIZER_VOCAB = 4096

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32",
          "float16": "float16", "fp16": "float16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Write a tiny HF-format checkpoint (config.json + model.safetensors) "
        "with seeded random weights, optionally as a compressed-tensors int8 W8A8 checkpoint.")
    p.add_argument("out_dir", help="directory to write (created if missing)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a real model's width (and depth, unless --num-layers), random "
                   "weights; explicit size options override it")
    p.add_argument("--arch", choices=sorted(ARCHS), default=None,
                   help="model architecture (default: the preset's, else qwen3)")
    p.add_argument("--hidden-size", type=int, default=None, help="(default 128)")
    p.add_argument("--intermediate-size", type=int, default=None, help="(default 256)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="(default: the preset's real depth, else 2)")
    p.add_argument("--num-heads", type=int, default=None, help="(default 4)")
    p.add_argument("--num-kv-heads", type=int, default=None, help="(default 2)")
    p.add_argument("--head-dim", type=int, default=None,
                   help="per-head size (default: the preset's, else hidden_size // num_heads)")
    p.add_argument("--vocab-size", type=int, default=None, help="(default 512)")
    p.add_argument("--max-position-embeddings", type=int, default=None,
                   help="(default 512)")
    p.add_argument("--rope-theta", type=float, default=None, help="(default 10000)")
    p.add_argument("--rms-norm-eps", type=float, default=None, help="(default 1e-6)")
    p.add_argument("--tie-word-embeddings", action="store_true", default=None,
                   help="share embed_tokens and lm_head (no lm_head.weight is written; "
                   "the presets tie them, as the real models do)")
    p.add_argument("--tokenizer", action="store_true",
                   help="also write a byte-level BPE tokenizer trained on a seeded "
                   "synthetic text (needs the tokenizers package)")
    p.add_argument("--tokenizer-vocab", type=int, default=None,
                   help=f"the tokenizer's entries (default: the vocabulary size, at most "
                   f"{DEFAULT_TOKENIZER_VOCAB}); the model's vocabulary must hold them")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES),
                   help="dtype of the float tensors and of config.json's dtype (default: bfloat16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--w8a8", action="store_true",
                   help="write a compressed-tensors int8 W8A8 checkpoint (per-channel weights)")
    p.add_argument("--act", choices=["dynamic", "static"], default="dynamic",
                   help="W8A8 activation scheme: dynamic per-token or static per-tensor "
                   "(default: dynamic)")
    p.add_argument("--input-absmax", type=float, default=6.0,
                   help="static W8A8 only: assumed |activation| maximum; input_scale = "
                   "absmax/127 for every quantized linear (default: 6.0)")
    args = p.parse_args(argv)
    for key, value in {**BASE_DEFAULTS, **PRESETS.get(args.preset, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "vocab_size", "max_position_embeddings"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.tokenizer_vocab is None:
        args.tokenizer_vocab = min(args.vocab_size, DEFAULT_TOKENIZER_VOCAB)
    if args.tokenizer and not 256 + len(SPECIAL_TOKENS) <= args.tokenizer_vocab <= \
            args.vocab_size:
        p.error(f"--tokenizer-vocab must be in [{256 + len(SPECIAL_TOKENS)}, --vocab-size = "
                f"{args.vocab_size}] (256 byte tokens and {len(SPECIAL_TOKENS)} specials "
                f"first), got {args.tokenizer_vocab}")
    if args.hidden_size % args.num_heads and args.head_dim is None:
        p.error("hidden-size must be divisible by num-heads (or pass --head-dim)")
    if args.num_heads % args.num_kv_heads:
        p.error("num-heads must be divisible by num-kv-heads")
    if args.act == "static" and not args.w8a8:
        p.error("--act static needs --w8a8")
    return args


def build_config(args):
    arch, model_type, qkv_bias, _ = ARCHS[args.arch]
    head_dim = args.head_dim or args.hidden_size // args.num_heads
    dtype = DTYPES[args.dtype]
    cfg = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "tie_word_embeddings": bool(args.tie_word_embeddings),
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": dtype,
    }
    if model_type == "llama":
        cfg.update({"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1})
    elif model_type == "mistral":
        cfg.update({"sliding_window": None})
    elif model_type == "qwen3":
        cfg.update({"attention_bias": False, "use_sliding_window": False,
                    "sliding_window": None, "max_window_layers": args.num_layers})
    elif model_type == "qwen2":
        cfg.update({"use_sliding_window": False, "sliding_window": None,
                    "max_window_layers": args.num_layers})
    if args.w8a8:
        cfg["quantization_config"] = w8a8_quant_config(args.act)
    return cfg


def w8a8_quant_config(act):
    """compressed-tensors config for int8 per-channel weights, int8 activations."""
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
               "dynamic": False, "group_size": None, "block_structure": None,
               "actorder": None, "observer": "minmax", "observer_kwargs": {}}
    if act == "dynamic":
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                "dynamic": True, "group_size": None, "block_structure": None,
                "actorder": None, "observer": None, "observer_kwargs": {}}
    else:
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
                "dynamic": False, "group_size": None, "block_structure": None,
                "actorder": None, "observer": "minmax", "observer_kwargs": {}}
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": acts,
                "output_activations": None,
                "format": "int-quantized",
            }
        },
    }


def make_tensors(args, torch):
    """Float weights in HF naming, seeded. Linear weights are [out, in]."""
    _, _, qkv_bias, qk_norm = ARCHS[args.arch]
    g = torch.Generator().manual_seed(args.seed)
    h, inter = args.hidden_size, args.intermediate_size
    nh, nkv = args.num_heads, args.num_kv_heads
    hd = args.head_dim or h // nh

    def lin(out_f, in_f):
        # ~unit-variance outputs for unit-variance inputs, so logits stay well separated.
        return torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)

    def norm(n):
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    t = {"model.embed_tokens.weight": torch.randn(args.vocab_size, h, generator=g)}
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm(h)
        t[p + "self_attn.q_proj.weight"] = lin(nh * hd, h)
        t[p + "self_attn.k_proj.weight"] = lin(nkv * hd, h)
        t[p + "self_attn.v_proj.weight"] = lin(nkv * hd, h)
        if qkv_bias:
            t[p + "self_attn.q_proj.bias"] = 0.1 * torch.randn(nh * hd, generator=g)
            t[p + "self_attn.k_proj.bias"] = 0.1 * torch.randn(nkv * hd, generator=g)
            t[p + "self_attn.v_proj.bias"] = 0.1 * torch.randn(nkv * hd, generator=g)
        if qk_norm:
            t[p + "self_attn.q_norm.weight"] = norm(hd)
            t[p + "self_attn.k_norm.weight"] = norm(hd)
        t[p + "self_attn.o_proj.weight"] = lin(h, nh * hd)
        t[p + "post_attention_layernorm.weight"] = norm(h)
        t[p + "mlp.gate_proj.weight"] = lin(inter, h)
        t[p + "mlp.up_proj.weight"] = lin(inter, h)
        t[p + "mlp.down_proj.weight"] = lin(h, inter)
    t["model.norm.weight"] = norm(h)
    if not args.tie_word_embeddings:
        t["lm_head.weight"] = lin(args.vocab_size, h)
    return t


def pad_vocab_rows(tensors, n_real):
    """Zero the embedding and lm_head rows of the ids >= ``n_real`` (those the tokenizer
    does not have): their logit is 0, so greedy decoding never picks them while any
    other logit is positive."""
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            tensors[name][n_real:] = 0
    return tensors


_ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t",
           "v", "w", "z", "br", "ch", "dr", "fl", "gr", "kl", "pr", "sh", "st", "th", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "io", "ou")
_CODAS = ("", "", "", "n", "r", "s", "l", "m", "nd", "st", "x")


def synthetic_text(seed: int, n_sentences: int, n_words: int = 3000) -> list[str]:
    """``n_sentences`` sentences of a seeded made-up language: a lexicon of ``n_words``
    words of 1-4 syllables drawn with Zipf frequencies, sentences of 4-24 words with
    capitals, commas, full stops, question marks and now and then a number. The same
    seed gives the same text on every machine (Python's ``random`` only)."""
    import random

    rng = random.Random(seed)
    lexicon = sorted({"".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                              for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4))))
                      for _ in range(2 * n_words)})[:n_words]
    rng.shuffle(lexicon)
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]
    out = []
    for _ in range(n_sentences):
        words = rng.choices(lexicon, weights, k=rng.randint(4, 24))
        if rng.random() < 0.1:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        for i in range(1, len(words) - 1):
            if rng.random() < 0.08:
                words[i] += ","
        end = "?" if rng.random() < 0.15 else "."
        out.append(words[0].capitalize() + " " + " ".join(words[1:]) + end)
    return out


def write_tokenizer(out_dir, vocab, seed, model_max_length):
    """Trains a byte-level BPE of ``vocab`` entries on :func:`synthetic_text` and writes
    it in the Hugging Face layout (``PreTrainedTokenizerFast``); returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # ~5 sentences per entry: enough text for every merge (a larger corpus only slows it).
    tok.train_from_iterator(synthetic_text(seed, min(20000, max(2000, 5 * vocab))),
                            trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    pad, bos, eos = SPECIAL_TOKENS
    special = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **special,
                   "model_max_length": model_max_length, "add_bos_token": False,
                   "add_eos_token": False, "clean_up_tokenization_spaces": False}, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
        f.write("\n")
    return tok.get_vocab_size()


QUANT_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                  "gate_proj.weight", "up_proj.weight", "down_proj.weight")


def quantize_w8a8(tensors, args, torch):
    """Replace decoder-layer linear weights by int8 weight + fp32 weight_scale [N, 1]."""
    out = {}
    for name, w in tensors.items():
        if name.startswith("model.layers.") and name.endswith(QUANT_SUFFIXES):
            base = name[: -len("weight")]
            absmax = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
            scale = (absmax / 127.0).float()
            q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
            out[base + "weight"] = q.contiguous()
            out[base + "weight_scale"] = scale.contiguous()
            if args.act == "static":
                out[base + "input_scale"] = torch.tensor([args.input_absmax / 127.0],
                                                         dtype=torch.float32)
        else:
            out[name] = w
    return out


def main(argv=None):
    args = parse_args(argv)
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, DTYPES[args.dtype])
    os.makedirs(args.out_dir, exist_ok=True)
    n_tok = None
    if args.tokenizer:
        n_tok = write_tokenizer(args.out_dir, args.tokenizer_vocab, args.seed,
                                args.max_position_embeddings)
    tensors = make_tensors(args, torch)
    if n_tok is not None:
        tensors = pad_vocab_rows(tensors, n_tok)
    if args.w8a8:
        tensors = quantize_w8a8(tensors, args, torch)
    tensors = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith(("_scale",))
                   else v).contiguous() for k, v in tensors.items()}

    cfg = build_config(args)
    with open(os.path.join(args.out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
           "do_sample": False}
    with open(os.path.join(args.out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")
    save_file(tensors, os.path.join(args.out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    n = sum(v.numel() for v in tensors.values())
    print(f"wrote {args.out_dir}: {cfg['architectures'][0]}"
          f"{' W8A8 ' + args.act if args.w8a8 else ''}, {len(tensors)} tensors, {n} elements"
          + (f", tokenizer of {n_tok} entries" if n_tok is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
