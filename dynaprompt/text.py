"""Learnable CoOp-style contexts on CLIP's text side, encoded for every prompt x class in one pass."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def text_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding CLIP's text transformer (CLIP keeps it flat, CustomTextCLIP under `.text`)."""
    tower = getattr(model, "text", model)
    for part in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
        if not hasattr(tower, part):
            raise TypeError(f"{type(model).__name__} has no CLIP-style text transformer (missing {part!r})")
    if getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax")) != "argmax":
        raise TypeError("only text towers pooled at the end-of-text token (pool_type 'argmax') are supported")
    return tower


def end_of_text_positions(tokens: torch.Tensor) -> torch.Tensor:
    """Index of the end-of-text token per row: CLIP's EOT has the highest id in the vocabulary."""
    return tokens.argmax(dim=-1)


def truncate_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Cut every row right after the last end-of-text token; the causal mask makes the rest dead weight."""
    return tokens[:, : int(end_of_text_positions(tokens).max()) + 1]


def run_text_tower(tower, embedded: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """CLIP's text transformer over token embeddings [N, L, width] of any length L; unnormalised features [N, E]."""
    length = embedded.shape[1]
    x = embedded + tower.positional_embedding[:length]
    mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
    x = tower.transformer(x, attn_mask=mask)
    x = tower.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    projection = tower.text_projection
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


def encode_tokens(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(tokens)` on sequences cut after the last end-of-text token (same features, less work)."""
    tower = text_tower(model)
    tokens = truncate_tokens(tokens)
    return run_text_tower(tower, tower.token_embedding(tokens), end_of_text_positions(tokens))


class TemplateCache:
    """Unit-norm text features of one template over a class list, computed once and kept on disk.

    An 80-template classifier over 200 classes is ~270 s of one CPU core at ViT-B/16 (a second on a GPU), and every
    run of a method that ensembles templates, and the testbed stage, asks for the same ones. The key holds every
    input of the bits: the weights' fingerprint and architecture, the activation, the class names, the template,
    this module's and the blocks' code, torch's and open_clip's versions, the device type and the CPU-kernel pins;
    a file is written under a temporary name and renamed, so concurrent writers never leave half a file.
    """

    def __init__(self, folder, identity: dict):
        self.folder = Path(folder)
        self.identity = identity

    def key(self, classnames, template: str) -> str:
        import open_clip

        code = b"".join((Path(__file__).parent / name).read_bytes() for name in ("text.py", "blocks.py"))
        payload = {**self.identity, "classnames": list(classnames), "template": template,
                   "code": hashlib.sha256(code).hexdigest()[:16], "torch": torch.__version__,
                   "open_clip": open_clip.__version__,
                   "pins": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def features(self, model, tokenizer, classnames, template, device) -> torch.Tensor:
        file = self.folder / f"{self.key(classnames, template)}.pt"
        if file.is_file():
            return torch.load(file, map_location=device, weights_only=True)
        features = template_features(model, tokenizer, classnames, template, device)
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = file.with_name(f"{file.name}.{os.getpid()}.partial")
        torch.save(features.cpu(), partial)
        os.replace(partial, file)
        return features


def template_features(model, tokenizer, classnames, template, device) -> torch.Tensor:
    """Unit-norm text features [C, E] of `template` filled with each class name."""
    texts = [template.format(name) if isinstance(template, str) else template(name) for name in classnames]
    return F.normalize(encode_tokens(model, tokenizer(texts).to(device)), dim=-1)


class PromptTextEncoder:
    """Text features of `{ctx} {classname}.` for any stack of contexts, all prompts x classes at once.

    `max_tokens` bounds the tokens of one pass through the text transformer: prompts x classes beyond it run in
    chunks of whole sequences, each under activation checkpointing when gradients flow, so the memory of a step
    is one chunk's activations whatever the number of prompts and classes (a DynaPrompt step over 10 prompts x
    1000 classes is ~180k tokens at ViT-B/16). 0: one pass, however large.
    """

    def __init__(self, model, tokenizer, classnames, n_ctx=4, ctx_init="a photo of a", truncate=True, init_seed=0,
                 max_tokens: int = 0, template_cache: TemplateCache | None = None):
        self.model = model
        self.max_tokens = max_tokens
        self.template_cache = template_cache
        self.tokenizer = tokenizer
        self.tower = text_tower(model)
        truncate = truncate and self.tower.attn_mask is not None  # only a causal mask makes the cut exact
        self.classnames = [name.replace("_", " ") for name in classnames]
        self.n_ctx = n_ctx
        device = self.tower.token_embedding.weight.device
        placeholder = ctx_init if ctx_init else " ".join(["X"] * n_ctx)
        tokens = tokenizer([f"{placeholder} {name}." for name in self.classnames]).to(device)
        self.truncate = truncate
        self.tokens = truncate_tokens(tokens) if truncate else tokens
        self.eot = end_of_text_positions(self.tokens)
        with torch.no_grad():
            embedded = self.tower.token_embedding(self.tokens)
        self.prefix = embedded[:, :1]  # start-of-text
        self.suffix = embedded[:, 1 + n_ctx :]  # class name, full stop, end-of-text, padding
        self.init_context = self._initial_context(tokenizer, ctx_init, embedded, init_seed)

    def _initial_context(self, tokenizer, ctx_init, embedded, init_seed) -> torch.Tensor:
        """v0: the embeddings of `ctx_init`, or CoOp's N(0, 0.02) draw when no words are given."""
        if not ctx_init:
            generator = torch.Generator().manual_seed(init_seed)
            draw = torch.randn(self.n_ctx, embedded.shape[-1], generator=generator) * 0.02
            return draw.to(embedded)
        n_words = int(end_of_text_positions(tokenizer([ctx_init]))[0]) - 1
        if n_words != self.n_ctx:
            raise ValueError(f"prompt.ctx_init {ctx_init!r} is {n_words} tokens but prompt.n_ctx is {self.n_ctx}")
        return embedded[0, 1 : 1 + self.n_ctx].clone()

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    @property
    def sequence_length(self) -> int:
        return self.tokens.shape[1]

    def encode(self, contexts: torch.Tensor) -> torch.Tensor:
        """Unit-norm text features [P, C, E] for contexts [P, n_ctx, width]: one pass, or chunks of rows."""
        n_rows = contexts.shape[0] * self.n_classes
        per_chunk = self.sequences_per_chunk
        if n_rows <= per_chunk:
            features = self._encode_rows(contexts, 0, n_rows)
        else:
            save_memory = torch.is_grad_enabled() and contexts.requires_grad
            chunks = []
            for start in range(0, n_rows, per_chunk):
                end = min(start + per_chunk, n_rows)
                if save_memory:  # keep only each chunk's inputs; its activations are recomputed in backward
                    chunks.append(checkpoint(self._encode_rows, contexts, start, end, use_reentrant=False))
                else:
                    chunks.append(self._encode_rows(contexts, start, end))
            features = torch.cat(chunks)
        return features.reshape(contexts.shape[0], self.n_classes, -1)

    @property
    def sequences_per_chunk(self) -> int:
        """Whole sequences per pass under `max_tokens` (at least one); unbounded without a budget."""
        if not self.max_tokens:
            return 1 << 62
        return max(1, self.max_tokens // self.sequence_length)

    def _encode_rows(self, contexts: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Unit-norm features [end - start, E] of rows start..end of the prompts x classes grid (prompt-major)."""
        rows = torch.arange(start, end, device=self.prefix.device)
        prompt, cls = rows // self.n_classes, rows % self.n_classes
        sequences = torch.cat([self.prefix[cls], contexts[prompt].to(self.prefix.dtype), self.suffix[cls]], dim=1)
        return F.normalize(run_text_tower(self.tower, sequences, self.eot[cls]), dim=-1)

    @torch.no_grad()
    def encode_templates(self, templates) -> torch.Tensor:
        """Zero-shot classifier [1, C, E]: features of each template, averaged per class, renormalised."""
        device, per_template = self.tokens.device, []
        for template in templates:
            if self.template_cache is not None and isinstance(template, str):
                per_template.append(self.template_cache.features(self.model, self.tokenizer, self.classnames, template,
                                                                 device))
            else:
                per_template.append(template_features(self.model, self.tokenizer, self.classnames, template, device))
        return F.normalize(torch.stack(per_template).mean(0), dim=-1).unsqueeze(0)

    def logit_scale(self) -> torch.Tensor:
        """CLIP's learned temperature, exponentiated (100 for OpenAI CLIP)."""
        return self.model.logit_scale.exp()
