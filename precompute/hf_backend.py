"""The transformers backend: for machines without vLLM, and the reference vLLM is tested
against (same model in float32: top-k logprobs agree to 1e-4).

It is many times slower than vLLM (no continuous batching, no paged KV cache); see
`make bench-precompute`. Samples are seeded per batch, so they differ from vLLM's; the
logprobs are the same raw log_softmax of the logits.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from precompute.config import SamplingConfig
from shards.topk import Scored

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _topk(logits: torch.Tensor, tokens: torch.Tensor, k: int):
    """(T, V) logits -> raw top-k ids/logprobs and the logprob of each chosen token."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    vals, ids = lp.topk(k, dim=-1)
    tok = lp.gather(-1, tokens[:, None].long())[:, 0]
    return ids.int().numpy(), vals.numpy(), tok.numpy()


class HFBackend:  # implements precompute.backend.Backend
    name = "hf"

    def __init__(
        self,
        model: str,
        k: int,
        dtype: str = "float32",
        device: str = "cpu",
        batch_size: int = 8,
        gguf_file: str | None = None,
    ):
        """model: a Hugging Face model folder or id; gguf_file: the weights are this GGUF
        file in that folder (transformers dequantizes it) instead of safetensors."""
        kw = {} if gguf_file is None else {"gguf_file": gguf_file}
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype], **kw)
        self.model = self.model.to(device)
        self.model.eval()
        self.k, self.device, self.batch_size = k, device, batch_size
        # The logit dimension, which may exceed the tokenizer (padded vocabularies).
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        gc = self.model.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.model.config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad = gc.pad_token_id if gc.pad_token_id is not None else min(self.eos, default=0)

    @torch.no_grad()
    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> list[Scored]:
        out = []
        for b in range(0, len(prompts), self.batch_size):
            ps, rs = prompts[b : b + self.batch_size], responses[b : b + self.batch_size]
            full = [list(p) + list(r) for p, r in zip(ps, rs, strict=True)]
            width = max(map(len, full))
            ids = torch.full((len(full), width), self.pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, f in enumerate(full):  # right padding: positions stay 0..len-1
                ids[i, : len(f)] = torch.tensor(f)
                mask[i, : len(f)] = 1
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits.cpu()
            for i, (p, r) in enumerate(zip(ps, rs, strict=True)):
                # Logits at position j predict token j + 1.
                rows = logits[i, len(p) - 1 : len(p) + len(r) - 1]
                t = torch.tensor(list(r))
                tid, tlp, tok = _topk(rows, t, self.k)
                out.append(Scored(np.asarray(r, np.int64), tid, tlp, tok))
        return out

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        sampling: SamplingConfig,
        fixed_length: bool = False,
    ) -> list[list[Scored]]:
        """Backend.generate with transformers' `generate`: one torch seed per batch (the
        seed of its first prompt), so samples differ from vLLM's."""
        results = []
        n = sampling.n
        for b in range(0, len(prompts), self.batch_size):
            ps = prompts[b : b + self.batch_size]
            width = max(map(len, ps))
            ids = torch.full((len(ps), width), self.pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(ps):  # left padding for generation
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            torch.manual_seed(seeds[b])
            greedy = sampling.temperature == 0
            # transformers refuses num_return_sequences > 1 without sampling; n greedy samples
            # are one sequence n times, so each prompt goes in n times (rows i*n + j still).
            copies = n if greedy else 1
            gen = self.model.generate(
                input_ids=ids.repeat_interleave(copies, 0).to(self.device),
                attention_mask=mask.repeat_interleave(copies, 0).to(self.device),
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None if greedy or sampling.top_k == 0 else sampling.top_k,
                max_new_tokens=sampling.max_tokens,
                min_new_tokens=sampling.max_tokens if fixed_length else None,
                num_return_sequences=n // copies,
                pad_token_id=self.pad,
                eos_token_id=sorted(self.eos) or None,
                # Raw logits (before temperature/top-p), as vLLM's raw_logprobs.
                output_logits=True,
                return_dict_in_generate=True,
            )
            logits = torch.stack(gen.logits, dim=1).cpu()  # (B*n, steps, V)
            seqs = gen.sequences[:, width:].cpu()
            for i in range(len(ps)):
                samples = []
                for j in range(n):
                    row = i * n + j
                    toks = seqs[row]
                    stop = (
                        []
                        if fixed_length
                        else [t for t in range(len(toks)) if int(toks[t]) in self.eos]
                    )
                    end = stop[0] + 1 if stop else len(toks)
                    tid, tlp, tok = _topk(logits[row, :end], toks[:end], self.k)
                    samples.append(
                        Scored(
                            toks[:end].numpy().astype(np.int64),
                            tid,
                            tlp,
                            tok,
                            "stop" if stop else "length",
                        )
                    )
                results.append(samples)
        return results

    def close(self) -> None:
        self.model = None
