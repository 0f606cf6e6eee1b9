"""A tiny random-weight Llama model with a locally trained tokenizer, for tests and examples.

No model hub is reachable where the engine tests run, so ``build_tiny_model`` makes a model
folder that stock vLLM loads like any Hugging Face checkpoint: a ``LlamaForCausalLM`` with
seeded random weights (float32: the CPU backend runs it reliably on machines without AVX-512
bf16) and a byte-level BPE tokenizer trained with the ``tokenizers`` library on generated
English-like text, wrapped as a ``PreTrainedTokenizerFast`` with ``<s>``/``</s>``/``<unk>``/
``<pad>`` and a small chat template so ``/v1/chat/completions`` works too.

The tokenizer adds ``<s>`` (BOS) in front of every encoded text, as Llama tokenizers do, so
the prompt token ids the engine hashes start with BOS; ``/tokenize`` on the server shows them.

The build happens once per folder: a marker file written last records the build parameters,
and a later call with the same parameters returns at once. Concurrent builders are serialised
with a lock file, and the folder is built beside ``dest`` and renamed into place.

``transformers``, ``tokenizers`` and ``torch`` are imported lazily: they come with vLLM.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MARKER_NAME = ".dynamo-ext-tiny-model.json"
BUILD_VERSION = 1

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = [UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]  # ids 0, 1, 2, 3

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

WORDS: tuple[str, ...] = tuple(
    """
    the of and to in is was that for it with as his on be at by this had not are but from or
    have an they which one you were her all she there would their we him been has when who
    will more no if out so said what up its about into than them can only other new some could
    time these two may then do first any my now such like our over man me even most made after
    also did many before must through back years where much your way well down should because
    each just those people how too little state good very make world still own see men work
    long get here between both life being under never day same another know while last might
    us great old year off come since against go came right used take three states himself few
    house use during without again place american around however home small found thought went
    say part once general high upon school every does got united left number course war until
    always away something fact though water less public put think almost hand enough far took
    head yet government system better set told nothing night end why called didn't eyes find
    going look asked later knew point next program city business give group toward young days
    let room president side social given present several order national possible rather second
    face per among form important often things looked early white case john become large big
    need four within felt along children saw best church ever least power development light
    thing seemed family interest want members mind country area others done turned although open
    god service certain kind problem began different door thus help sense means whole matter
    perhaps itself york times law human line above name example action company hands local show
    whether five history gave today either act feet across taken past quite anything seen having
    death week experience body word half really field am car words already themselves information
    tell together college shall money period held keep sure probably free seems political real
    behind cannot miss question air office making brought whose special heard major problems ago
    became federal moment study available known result street economic boy position reason change
    south board individual job areas society west close turn love community true court force full
    seem am river garden mountain window paper music market morning evening winter summer story
    student teacher doctor table letter bridge forest village island ocean animal flower engine
    cache router token block prefix worker model server request stream signal memory vector
    """.split()
)
_PUNCT = (".", ".", ".", ",", "?", "!", ";")


def default_model_dir() -> Path:
    """Where the shared tiny model lives: ``$DYNAMO_EXT_MODEL_CACHE`` or
    ``~/.cache/dynamo-ext/tiny-llama``."""
    env = os.environ.get("DYNAMO_EXT_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "dynamo-ext" / "tiny-llama"


def english_like_text(num_words: int, seed: int = 0) -> str:
    """Deterministic pseudo-English: sentences of random common words with punctuation.

    Used to train the tokenizer and handy for prompts; with the default vocabulary every
    word is about one token, so ``num_words`` words give roughly ``num_words`` tokens.
    """
    rng = random.Random(seed)
    out: list[str] = []
    sentence_left = 0
    capitalize = True
    for _ in range(num_words):
        if sentence_left == 0:
            sentence_left = rng.randint(5, 18)
        word = rng.choice(WORDS)
        if capitalize:
            word = word.capitalize()
            capitalize = False
        sentence_left -= 1
        if sentence_left == 0:
            punct = rng.choice(_PUNCT)
            word += punct
            capitalize = punct in ".?!"
        elif rng.random() < 0.04:
            word += ","
        out.append(word)
    return " ".join(out)


def _training_corpus(seed: int, lines: int = 4000, words_per_line: int = 60) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(lines):
        yield english_like_text(words_per_line, seed=rng.getrandbits(32))
    # Digits and a little code-ish text so they merge into tokens too.
    for i in range(500):
        yield f"{i} {i * 7} {i * 131} id_{i} item-{i} v{i}.{i % 10}"


def _params(num_layers: int, hidden: int, vocab: int, max_pos: int, seed: int) -> dict[str, Any]:
    return {
        "build_version": BUILD_VERSION,
        "num_layers": num_layers,
        "hidden": hidden,
        "vocab": vocab,
        "max_pos": max_pos,
        "seed": seed,
        "dtype": "float32",
    }


def _is_complete(dest: Path, params: dict[str, Any]) -> bool:
    marker = dest / MARKER_NAME
    try:
        return bool(json.loads(marker.read_text()) == params)
    except (OSError, ValueError):
        return False


def _build_tokenizer(out: Path, vocab: int, max_pos: int, seed: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_pos,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return fast


def _build_model(
    out: Path, num_layers: int, hidden: int, vocab: int, max_pos: int, seed: int
) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # The CPU attention backend takes head sizes 32, 64, 80, ...: use heads of 64 (or 32).
    head_dim = 64 if hidden % 64 == 0 else 32
    if hidden % head_dim:
        raise ValueError(f"hidden must be a multiple of 32, got {hidden}")
    num_heads = hidden // head_dim
    # transformers 5 spells RoPE settings ``rope_parameters``; older ones ``rope_theta``.
    rope: dict[str, Any] = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    config = LlamaConfig(
        **rope,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    model.save_pretrained(str(out), safe_serialization=True)


def build_tiny_model(
    dest: Path,
    *,
    num_layers: int = 2,
    hidden: int = 64,
    vocab: int = 2048,
    max_pos: int = 4096,
    seed: int = 0,
) -> Path:
    """Build (once) a random-weight Llama model and its tokenizer in ``dest``; return ``dest``.

    Returns at once when ``dest`` already holds a complete build with the same parameters;
    a folder with another build (or an incomplete one) is replaced.
    """
    dest = Path(dest).expanduser().resolve()
    params = _params(num_layers, hidden, vocab, max_pos, seed)
    if _is_complete(dest, params):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock_path = dest.parent / f".{dest.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _is_complete(dest, params):  # another process built it meanwhile
                return dest
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
            try:
                _build_tokenizer(tmp, vocab, max_pos, seed)
                _build_model(tmp, num_layers, hidden, vocab, max_pos, seed)
                (tmp / MARKER_NAME).write_text(json.dumps(params, sort_keys=True))
                tmp.chmod(0o755)
                if dest.exists():
                    shutil.rmtree(dest)
                os.replace(tmp, dest)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return dest


__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "build_tiny_model",
    "default_model_dir",
    "english_like_text",
]
