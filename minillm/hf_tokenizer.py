"""Hugging Face tokenizer interoperability: minillm's tokenizers as HF files and HF directories as
minillm's tokenizers.

    to_hf(tokenizer) -> dict              the tokenizer.json object `tokenizers` loads (what save writes)
    from_hf(obj, where) -> tokenizer      an HF tokenizer.json object -> Tokenizer / CharTokenizer
    load_directory(directory)             tokenizer.json (any format minillm reads), else vocab.json +
                                          merges.txt (GPT-2's pair), else None
    companion_files(tokenizer)            {filename: bytes} that `transformers.AutoTokenizer` needs next
                                          to tokenizer.json (tokenizer_config.json)

The format itself (what is written, what is refused and why) is minillm/tokenizer_json.py. Anything minillm
cannot reproduce exactly is one ValueError naming the file and the key, never a tokenizer with other ids.
"""

import json
import os

from minillm import tokenizer_json
from minillm.char_tokenizer import load_tokenizer, tokenizer_from_vocabulary

TOKENIZER_FILE, CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
VOCAB_FILE, MERGES_FILE = "vocab.json", "merges.txt"
EOT = "<|endoftext|>"
# tokenizer_config.json settings with which transformers would encode otherwise than tokenizer.json says
_CONFIG_REFUSED = ("add_bos_token", "add_eos_token", "add_prefix_space", "do_lower_case")


def to_hf(tokenizer):
    """A minillm tokenizer -> the HF tokenizer.json object its save writes."""
    if hasattr(tokenizer, "chars"):
        return tokenizer_json.char_to_hf(tokenizer.chars, tokenizer.special_tokens)
    return tokenizer_json.bpe_to_hf(tokenizer.tokens, tokenizer.special_tokens)


def from_hf(obj, where="tokenizer.json"):
    """An HF tokenizer.json object (a dict) -> Tokenizer or CharTokenizer; ValueError naming the key that
    minillm cannot reproduce."""
    return tokenizer_from_vocabulary(tokenizer_json.parse(obj, where), where)


def companion_files(tokenizer, model_max_length=None):
    """{filename: bytes}: tokenizer_config.json, with which `AutoTokenizer.from_pretrained(directory)`
    (beside the tokenizer.json of to_hf) gives minillm's ids and decode: a PreTrainedTokenizerFast, no
    clean-up of spaces in decode, <|endoftext|> as its bos and eos (as GPT-2's), model_max_length if
    given (the model's context)."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False}
    if tokenizer.eot_id is not None:
        config["bos_token"] = config["eos_token"] = EOT
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    return {CONFIG_FILE: (json.dumps(config, indent=2) + "\n").encode()}


def load_directory(directory):
    """A tokenizer from an HF-style directory: tokenizer.json, else vocab.json + merges.txt; None when it
    has neither. A tokenizer_config.json asking transformers to add tokens or spaces is refused."""
    directory = os.fspath(directory)
    _check_config(directory)
    path = os.path.join(directory, TOKENIZER_FILE)
    if os.path.isfile(path):
        return load_tokenizer(path)
    vocab, merges = (os.path.join(directory, n) for n in (VOCAB_FILE, MERGES_FILE))
    if not os.path.isfile(vocab) and not os.path.isfile(merges):
        return None
    for p in (vocab, merges):
        if not os.path.isfile(p):
            raise ValueError(f"{p}: no such file ({VOCAB_FILE} and {MERGES_FILE} go together)")
    obj = _vocab_merges_to_hf(_read_json(vocab), _read_text(merges), vocab)
    return from_hf(obj, where=f"{vocab} + {MERGES_FILE}")


def _vocab_merges_to_hf(vocab, merges, where):
    """GPT-2's two files as Hugging Face saves them (vocab.json: {token: id}; merges.txt: "a b" lines
    after an optional "#version" line) -> an HF tokenizer.json dict of GPT-2's settings. Vocabulary
    entries past the merges (256 + len(merges) and up: GPT-2's <|endoftext|>) are the special tokens."""
    if not isinstance(vocab, dict):
        raise ValueError(f"{where}: vocab.json must be a JSON object of token -> id")
    lines = [ln for ln in merges.split("\n") if ln and not ln.startswith("#version")]
    n = 256 + len(lines)
    specials = {s: i for s, i in vocab.items() if isinstance(i, int) and i >= n}
    pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    model = {"type": "BPE", "vocab": vocab, "merges": [ln.rstrip("\r") for ln in lines]}
    return tokenizer_json.hf_document(model, pre, {"type": "ByteLevel"}, specials)


def _check_config(directory):
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        return
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    for key in _CONFIG_REFUSED:
        if config.get(key):
            raise ValueError(f"{path}: {key}: true, which makes transformers add to what tokenizer.json gives; "
                             "minillm does not")


def _read_text(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def _read_json(path):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
