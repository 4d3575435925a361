"""The benchmark's fixed inputs, shared by every contender: tokenizer, data, models, FLOP peak, timing helpers.

Data (identical for all contenders): synthetic lowercase text of random words, byte-level tokenizer (256 bytes +
pad/bos/eos, one token per character). CPU profile: per pair, prompt length ~ U{30..60} characters (+ bos), chosen
and rejected lengths independently ~ U{20..60} characters (+ eos): a row prompt + completion is 51-122 tokens, so all
of it fits max_length 128 and nothing is truncated; a shared-prompt sequence (prompt + chosen + rejected) is 71-183.
GPU profile: prompts U{150..450}, responses U{100..500} characters, max_length 1024 (nothing truncated either).
"""

from __future__ import annotations

import json
import random
import resource
import tempfile
import time
from pathlib import Path

import torch

WORKDIR = Path(tempfile.gettempdir()) / "prefopt-bench"  # models and data every benchmark script shares

WORDS = (
    "the a of and to in is was it for on that with as at by this be from or an are not have but his they were "
    "which one you all had her been has there their more when will would what so out up about into them can only "
    "other new some could time these two may then first any like now my such make over our even most after also"
).split()

# name -> config kwargs. 1m and 20m: Llama with the byte vocabulary (CPU). qwen0.5b: Qwen2.5-0.5B's shape, its
# 151,936-token vocabulary included (the LM head is a large share of its work), randomly initialized (GPU).
MODEL_SIZES: dict[str, dict[str, int]] = {
    "1m": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4},
    "20m": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 6, "num_attention_heads": 8},
    "qwen0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                 "num_key_value_heads": 2, "vocab_size": 151936},
}
# Characters per prompt and per response, uniform in [low, high], for each benchmark profile.
TEXT_CHARS = {"cpu": {"prompt": (30, 60), "response": (20, 60)}, "gpu": {"prompt": (150, 450), "response": (100, 500)}}


def byte_tokenizer():
    """A pure byte-level tokenizer: 256 byte tokens, then <pad>=256, <bos>=257, <eos>=258; bos prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = sorted(alphabet, key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(byte_to_char)}
    vocab.update({"<pad>": 256, "<bos>": 257, "<eos>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 257)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(map(chr, cs), bs))[char]


def _text(rng: random.Random, n: int) -> str:
    words = []
    while len(" ".join(words)) < n:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:n].rstrip().ljust(n, "s")


def make_pairs(n: int, seed: int = 0, profile: str = "cpu") -> list[dict[str, str]]:
    rng = random.Random(seed)
    chars = TEXT_CHARS[profile]
    rows = []
    for _ in range(n):
        prompt = _text(rng, rng.randint(*chars["prompt"])) + ":"
        chosen = " " + _text(rng, rng.randint(*chars["response"]) - 1)
        rejected = " " + _text(rng, rng.randint(*chars["response"]) - 1)
        if chosen != rejected:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def make_model(size: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kwargs = {"vocab_size": 259, "num_key_value_heads": MODEL_SIZES[size]["num_attention_heads"], **MODEL_SIZES[size]}
    common = {"tie_word_embeddings": True, "pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 258}
    if size.startswith("qwen"):
        return Qwen2ForCausalLM(Qwen2Config(max_position_embeddings=4096, rope_theta=1e6, **common, **kwargs))
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=512, **common, **kwargs))


def build_inputs(root: Path, size: str, n_pairs: int, seed: int = 0, profile: str = "cpu") -> dict[str, str]:
    """Write the model + tokenizer directory and the data (jsonl and a save_to_disk DatasetDict) under root."""
    import datasets

    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / f"model_{size}"
    if not (model_dir / "config.json").is_file():
        make_model(size, seed).save_pretrained(model_dir)
        byte_tokenizer().save_pretrained(model_dir)
    rows = make_pairs(n_pairs + 16, seed, profile)
    train, val = rows[:n_pairs], rows[n_pairs:]
    jsonl = root / f"pairs_{profile}_{n_pairs}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in train))
    disk = root / f"pairs_{profile}_{n_pairs}"
    if not disk.is_dir():
        datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(train), "validation": datasets.Dataset.from_list(val)}
        ).save_to_disk(str(disk))
    return {"model": str(model_dir), "jsonl": str(jsonl), "dataset": str(disk)}


def tokenized_pairs(jsonl: str, tokenizer) -> list[dict[str, list[int]]]:
    """prompt_ids (bos + prompt), chosen_ids / rejected_ids (completion + eos): the same ids every contender sees."""
    out = []
    for line in Path(jsonl).read_text().splitlines():
        r = json.loads(line)
        eos = [tokenizer.eos_token_id]
        out.append({
            "prompt_ids": tokenizer(r["prompt"])["input_ids"],
            "chosen_ids": tokenizer(r["chosen"], add_special_tokens=False)["input_ids"] + eos,
            "rejected_ids": tokenizer(r["rejected"], add_special_tokens=False)["input_ids"] + eos,
        })
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux carries that over fork and exec, so a
    worker would report at least its parent's size at the moment it was started."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float:
    """Peak memory the caching allocator handed out on the GPU (0 without one)."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def gpu_bf16_peak_gflops(n: int = 8192, reps: int = 10) -> float:
    """Best of 5 timings of `reps` bf16 (n x n) @ (n x n) products on the GPU, in GFLOP/s (as matmul_peak_gflops)."""
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        best = max(best, reps * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


PEAK_SHAPES = ((2048, 2048, 2048), (1024, 4096, 1024), (1024, 512, 1408), (1024, 1408, 512), (4096, 4096, 4096))


def matmul_peak_gflops(threads: int = 2, shapes=PEAK_SHAPES, trials: int = 5) -> float:
    """Best fp32 matmul rate (GFLOP/s) on `threads` threads over square and model-shaped (m, k, n) products."""
    torch.set_num_threads(threads)
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        reps = max(1, int(2e10 / (2 * m * k * n)))
        for _ in range(2):
            a @ b
        for _ in range(trials):
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = max(best, reps * 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return best
