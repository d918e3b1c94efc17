"""`--verify`: source and output logits and perplexities on a text (Austen by default)."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..models import AttnVariantLlamaConfig, AttnVariantLlamaForCausalLM
from .common import _dtype_name, _quiet_transformers, ConversionError, DTYPES, VERIFY_TEXT_LABEL, VERIFY_TOKENS
from .load import _dequantized
from .plan import _function_preserving
from .sources import _gguf_stock_class, SourceCheckpoint


# The opening of data/austen/austen_prideprejudice.txt, shipped inside the package so `--verify` works anywhere.
AUSTEN_EXCERPT = """\
It is a truth universally acknowledged, that a single man in possession
of a good fortune, must be in want of a wife.

However little known the feelings or views of such a man may be on his
first entering a neighbourhood, this truth is so well fixed in the minds
of the surrounding families, that he is considered the rightful property
of some one or other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that
Netherfield Park is let at last?"

Mr. Bennet replied that he had not.

"But it is," returned she; "for Mrs. Long has just been here, and she
told me all about it."

Mr. Bennet made no answer.

"Do you not want to know who has taken it?" cried his wife impatiently.

"_You_ want to tell me, and I have no objection to hearing it."

This was invitation enough.

"Why, my dear, you must know, Mrs. Long says that Netherfield is taken
by a young man of large fortune from the north of England; that he came
down on Monday in a chaise and four to see the place, and was so much
delighted with it, that he agreed with Mr. Morris immediately; that he
is to take possession before Michaelmas, and some of his servants are to
be in the house by the end of next week."

"What is his name?"

"Bingley."

"Is he married or single?"

"Oh! Single, my dear, to be sure! A single man of large fortune; four or
five thousand a year. What a fine thing for our girls!"

"How so? How can it affect them?"

"My dear Mr. Bennet," replied his wife, "how can you be so tiresome! You
must know that I am thinking of his marrying one of them."

"Is that his design in settling here?"

"Design! Nonsense, how can you talk so! But it is very likely that he
_may_ fall in love with one of them, and therefore you must visit him as
soon as he comes."

"I see no occasion for that. You and the girls may go, or you may send
them by themselves, which perhaps will be still better, for as you are
as handsome as any of them, Mr. Bingley may like you the best of the
party."

"My dear, you flatter me. I certainly _have_ had my share of beauty, but
I do not pretend to be anything extraordinary now. When a woman has five
grown-up daughters, she ought to give over thinking of her own beauty."

"In such cases, a woman has not often much beauty to think of."

"But, my dear, you must indeed go and see Mr. Bingley when he comes into
the neighbourhood."

"It is more than I engage for, I assure you."

"But consider your daughters. Only think what an establishment it would
be for one of them. Sir William and Lady Lucas are determined to
go, merely on that account, for in general, you know, they visit no
newcomers. Indeed you must go, for it will be impossible for _us_ to
visit him if you do not."

"You are over-scrupulous, surely. I dare say Mr. Bingley will be very
glad to see you; and I will send a few lines by you to assure him of my
hearty consent to his marrying whichever he chooses of the girls; though
I must throw in a good word for my little Lizzy."

"I desire you will do no such thing. Lizzy is not a bit better than the
others; and I am sure she is not half so handsome as Jane, nor half so
good-humoured as Lydia. But you are always giving _her_ the preference."
"""


@dataclasses.dataclass
class Verification:
    text_label: str
    num_tokens: int
    tokenized: bool  # False: no tokenizer, seeded random token ids were used (perplexities then mean little)
    max_abs_logit_diff: float
    tolerance: float
    source_perplexity: float
    output_perplexity: float
    function_preserving: bool
    weights_dtype: str

    @property
    def passed(self) -> bool:
        finite = math.isfinite(self.max_abs_logit_diff) and math.isfinite(self.output_perplexity)
        return finite and (not self.function_preserving or self.max_abs_logit_diff <= self.tolerance)

    def summary(self) -> str:
        outcome = (
            ("passed" if self.passed else "FAILED") + f" (function-preserving: tolerance {self.tolerance:.2g})"
            if self.function_preserving
            else "reported only (stick-breaking or NoPE changes the function; fine-tune before use)"
        )
        return (
            f"max |Δlogit| = {self.max_abs_logit_diff:.3g}, perplexity source {self.source_perplexity:.4g} -> output "
            f"{self.output_perplexity:.4g} on {self.num_tokens} tokens of {self.text_label}; {outcome}"
        )


def verify_conversion(source: SourceCheckpoint, output_folder: str, text: str | None = None,
                      text_label: str | None = None, max_tokens: int = VERIFY_TOKENS, progress: bool = False,
                      source_model=None) -> Verification:
    """Run the source (transformers' own class) and the saved output on `text`; compare logits and perplexities.

    Both load the saved weights' dtype (the source is cast the way the output was) and compute in float32, so a
    function-preserving conversion must agree to float rounding. `source_model`: transformers' model of the source
    already loaded in that dtype (used instead of loading it again).
    """
    with open(os.path.join(output_folder, "config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    dtype = DTYPES.get(saved.get("dtype") or "float32", torch.float32)
    config = AttnVariantLlamaConfig.from_pretrained(output_folder)
    text = AUSTEN_EXCERPT if text is None else text
    text_label = text_label or (VERIFY_TEXT_LABEL if text is AUSTEN_EXCERPT else "the given text")
    limit = max(2, min(max_tokens, config.max_position_embeddings))
    tokenizer = None
    if any(os.path.isfile(os.path.join(output_folder, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(output_folder)
    if tokenizer is not None:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=limit).input_ids
    else:  # no tokenizer: the logits comparison still means something, the perplexities little
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (1, min(256, limit)), generator=generator)
        text_label = "seeded random token ids (no tokenizer)"
    if ids.shape[1] < 2:
        raise ConversionError(f"the verification text gives {ids.shape[1]} token(s); at least 2 are needed")

    results = {}
    steps = [("output", None), ("source", None)]
    for which, _ in tqdm(steps, desc="verify", unit="model", disable=not progress, leave=False):
        with _quiet_transformers():
            if which == "output":
                model = AttnVariantLlamaForCausalLM.from_pretrained(output_folder, dtype=dtype)
            elif source_model is not None:
                model, source_model = source_model, None
            elif source.gguf_file:
                model = _dequantized(_gguf_stock_class(source.model_type).from_pretrained(
                    source.folder, gguf_file=source.gguf_file, dtype=dtype
                ))
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    source.folder, dtype=dtype, use_safetensors=True, trust_remote_code=False
                )
        model = model.float().eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        results[which] = (logits, math.exp(min(loss.item(), 700.0)))
        del model
    diff = (results["output"][0] - results["source"][0]).abs().max().item()
    scale = max(1.0, results["source"][0].abs().max().item())
    return Verification(
        text_label=text_label, num_tokens=int(ids.shape[1]), tokenized=tokenizer is not None,
        max_abs_logit_diff=diff, tolerance=8 * torch.finfo(torch.float32).eps * scale,
        source_perplexity=results["source"][1], output_perplexity=results["output"][1],
        function_preserving=_function_preserving(config), weights_dtype=_dtype_name(dtype),
    )
