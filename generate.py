"""Text generation with the hand-written GPT-2 holding pretrained weights: the gen mode (one sample streamed
as it comes, or K samples decoded as one batch)."""
import hashlib

import torch

from backbones import model_type
from machine import autocast_dtype, pick_device, seed_everything
from model import merge_adapters
from utils import UserError, attach_adapter, load_gpt, load_tokenizer, read_adapter


def sample_seed(sr, i):
    """The seed of sample i of SR: SR itself for the first, then a hash of (SR, i) (torch's CPU generator
    keeps only 32 bits of a seed, so SR + i * 2^32 would repeat the first sample)."""
    return sr if i == 0 else int.from_bytes(hashlib.sha256(f"{sr}/{i}".encode()).digest()[:4], "little")


def generate(args):
    """`run.py gen`: the prompt continued by the hand-written GPT-2 (with an adapter merged in, if given)."""
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}.")
    if args.gguf_file:
        raise UserError("gen runs the hand-written GPT-2 only; --gguf-file is for the training modes.")
    seed_everything(args.SR)
    device = pick_device(args.device)
    model, tok = load_model(args, device)
    virtual = model._modules.get("prompt_encoder")
    ids = encode_prompt(args.prompt, tok, model.config.block_size, virtual.num_virtual_tokens if virtual else 0)
    ids = ids.to(device)
    # Sample i is seeded by (SR, i) alone: the same text whether it is drawn alone or among K.
    gens = [torch.Generator(device=device).manual_seed(sample_seed(args.SR, i)) for i in range(args.num_samples)]
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=tok.eos_token_id)
    amp = autocast_dtype(args.precision, device)
    with torch.autocast(device.type, dtype=amp) if amp else torch.no_grad():
        if args.num_samples == 1:
            stream_one(model, tok, args.prompt, ids, args.max_new_tokens, gens[0], sampling)
        else:
            sample_many(model, tok, args.prompt, ids, args.max_new_tokens, gens, sampling)


def load_model(args, device):
    """The GPT-2 of --model (default: the adapter's base model, else gpt2) and its tokenizer, with --adapter
    merged in; refuses models it can tell are not GPT-2."""
    extras = {}
    if args.adapter:
        settings, tensors, extras = read_adapter(args.adapter)
    model_name = args.model or extras.get("model") or "gpt2"
    if model_type(model_name) not in ("gpt2", None):  # None: a hub id not cached here, load_gpt tells
        raise UserError(f"gen runs the hand-written GPT-2 only (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, or "
                        f"a GPT-2 directory); --model {model_name} is not one. The other backbones are for the "
                        f"training modes.")
    model = load_gpt(model_name)
    tok = load_tokenizer(args.tokenizer or extras.get("tokenizer") or model_name)
    if args.adapter:
        attach_adapter(model, settings, tensors)
        if settings["kind"] in ("prompt", "prefix"):  # nothing to merge: the virtual tokens go before the prompt
            print(f"[adapter {args.adapter}: {settings['num_virtual_tokens']} virtual tokens of {settings['kind']} "
                  f"tuning before the prompt, on {model_name}]")
        else:
            merge_adapters(model)  # inference at base speed
            print(f"[adapter {args.adapter} merged into {model_name}]")
    return model.to(device).eval(), tok


def encode_prompt(prompt, tok, block_size, virtual=0):
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise UserError("--prompt is empty: give at least one word to continue.")
    if virtual + ids.shape[1] >= block_size:
        raise UserError(f"--prompt is {ids.shape[1]} tokens" + (f", after the adapter's {virtual} virtual tokens"
                        if virtual else "") + f"; the model's block size is {block_size}.")
    return ids


def stream_one(model, tok, prompt, ids, max_new_tokens, generator, sampling):
    """One sample, printed as it comes."""
    print(prompt, end="", flush=True)
    new, shown = [], ""
    for nxt in model.generate(ids, max_new_tokens, generator=generator, **sampling):
        new.append(int(nxt[0]))
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(flush=True)


def sample_many(model, tok, prompt, ids, max_new_tokens, generators, sampling):
    """K samples decoded as one batch, printed when done; each stops at its own end-of-text."""
    rows = [[] for _ in generators]
    for nxt in model.generate(ids, max_new_tokens, generator=generators, num_samples=len(generators), **sampling):
        for row, t in zip(rows, nxt.tolist()):
            if not row or row[-1] != tok.eos_token_id:
                row.append(t)
    for i, row in enumerate(rows):
        print(f"{chr(10) if i else ''}----- sample {i + 1} of {len(rows)} -----")
        print(prompt + tok.decode(row), flush=True)
