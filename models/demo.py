"""The trained X-LoRA demo (`xlora-demo`): four LoRA experts that each know one task, and a classifier that
routes every token to the expert of its task. Trained on the CPU from nothing, deterministically.

    python -m models.recipes xlora-demo       # rebuild it into models/built/xlora-demo (10-13 minutes, one thread)
    python -m models.recipes xlora-demo --out models     # ... replacing the committed models/xlora-demo

Stages (each seeded; fixed thread count, deterministic algorithms):
    tokenizer   byte-level BPE (digits split one by one) trained on the task texts, with a chat template
    base        a small Llama pretrained on a mixed corpus of the tasks' vocabularies, without their answers
    experts     one PEFT LoRA per task (spell, reverse, translate, brackets), the four trained together on the
                frozen base in the X-LoRA forward, each turn of a chat routed to its task's expert
    classifier  the X-LoRA classifier on the mixture (single questions and chats of 2-4 turns mixing tasks),
                experts and base frozen, with this project's `add_xlora_to_model` and its training forward (one set
                of scalings per token for all modules, softmax temperature 0.25)

The tasks, one line each: "QUESTION = ANSWER</s>" (a chat is such lines, one per turn: see CHAT_TEMPLATE):
    spell      "spell: 374 = three seven four"               three digits, spelled
    reverse    "reverse: cat dog sun = sun dog cat"          three nouns, in reverse order
    translate  "translate: big red runs = lupe miko vomu"    three words into a toy language, word by word
    brackets   "close: ( [ { < ( = ) > } ] )"                the closing brackets of five, innermost first
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

TASKS = ("spell", "reverse", "translate", "brackets")
# Each task has its own words, so that a token's text already says which expert it belongs to.
NOUNS = ("cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "house", "river", "stone", "king", "boat",
         "cake", "lamp", "rose")  # reverse
ENGLISH = ("red", "blue", "green", "big", "small", "old", "runs", "sees", "eats", "jumps", "sings", "sleeps", "fast",
           "happy", "cold", "warm")  # translate, into TOY
TOY = ("miko", "zor", "tafa", "lupe", "kesh", "dari", "vomu", "nelo", "pirt", "sabu", "gane", "folo", "qiri",
       "weta", "hubo", "jinu")
TRANSLATION = dict(zip(ENGLISH, TOY))
BRACKETS = {"(": ")", "[": "]", "{": "}", "<": ">"}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
EOS = "</s>"
# A simple chat template (system, user, assistant) that renders a chat as the plain lines the model was trained on:
# "SYSTEM\n", then per turn "QUESTION =" and " ANSWER</s>\n". A one-question chat is the plain prompt "QUESTION =";
# the generation prompt adds nothing (a user turn already ends with " =").
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}{{ message['content'] }} ="
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}</s>\n"
    "{% endif %}{% endfor %}")
SYSTEM_PROMPTS = ("You are a helpful toy model.", "Answer briefly.", "You know four small tasks.")
DIGITS = 3  # digits of a spell question
WORDS = 3  # words of a reverse or translate question
OPENS = 5  # brackets of a close question


# ----------------------------------------------------------------------------------------------- the tasks
def question(task: str, rng: random.Random) -> tuple[str, str]:
    """A random (question, answer) of `task`."""
    if task == "spell":
        digits = "".join(rng.choices("0123456789", k=DIGITS))
        return f"spell: {digits}", " ".join(DIGIT_WORDS[int(d)] for d in digits)
    if task == "reverse":
        words = rng.choices(NOUNS, k=WORDS)
        return "reverse: " + " ".join(words), " ".join(reversed(words))
    if task == "translate":
        words = rng.choices(ENGLISH, k=WORDS)
        return "translate: " + " ".join(words), " ".join(TRANSLATION[w] for w in words)
    if task == "brackets":
        opens = rng.choices(list(BRACKETS), k=OPENS)
        return "close: " + " ".join(opens), " ".join(BRACKETS[o] for o in reversed(opens))
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def held_out(q: str) -> bool:
    """One question in eight is kept for evaluation and never trained on (a stable hash of its text)."""
    return zlib.crc32(q.encode()) % 8 == 0


def sample(task: str, rng: random.Random, evaluation: bool = False) -> tuple[str, str]:
    """A (question, answer) of `task` from the training split, or from the held-out split."""
    while True:
        q, a = question(task, rng)
        if held_out(q) == evaluation:
            return q, a


def plain_prompt(q: str) -> str:
    """The prompt of a question; the answer follows it after a space, then eos."""
    return f"{q} ="


def chat_prompt(turns: list[tuple[str, str]], q: str, system: str | None = None) -> str:
    """The chat template's rendering of earlier (question, answer) turns then question `q` (the same text as
    `CHAT_TEMPLATE` renders; a test checks it)."""
    text = f"{system}\n" if system else ""
    for tq, ta in turns:
        text += f"{plain_prompt(tq)} {ta}{EOS}\n"
    return text + plain_prompt(q)


def eval_set(task: str, count: int, seed: int = 1) -> list[tuple[str, str]]:
    """`count` distinct held-out (question, answer) pairs of `task`, the same on every machine."""
    rng, seen, out = random.Random(f"eval-{task}-{seed}"), set(), []
    for _ in range(100 * count):
        q, a = sample(task, rng, evaluation=True)
        if q not in seen:
            seen.add(q)
            out.append((q, a))
            if len(out) == count:
                break
    return out


def chat_set(task: str, count: int, seed: int = 1) -> list[tuple[str, str]]:
    """`count` (chat prompt, answer) pairs: a held-out question of `task` after 1-3 answered lines of random tasks."""
    rng = random.Random(f"chat-{task}-{seed}")
    out = []
    for q, a in eval_set(task, count, seed):
        turns = [sample(rng.choice(TASKS), rng) for _ in range(rng.randint(1, 3))]
        out.append((chat_prompt(turns, q), a))
    return out


# ----------------------------------------------------------------------------------------------- the texts
# A training example is a list of (text, trained, task) segments: the loss is taken on the trained ones only
# (answers; everything for the base); `task` is the turn a segment belongs to (None: a system line), the routing the
# experts are trained with. Segments end where the tokenizer splits anyway, so tokenizing them one by one gives the
# tokens of the whole text. A turn is "QUESTION =" then " ANSWER</s>", and "\n" when another turn follows.
Example = list[tuple[str, bool, str | None]]


def task_example(task: str, rng: random.Random, system_share: float = 0.2, context_share: float = 0.4) -> Example:
    """One example of `task`: "QUESTION =" + " ANSWER</s>" (trained), sometimes after a system line, sometimes
    after 1-3 answered turns of any task (context, not trained): the text `chat_prompt` renders."""
    system = rng.choice(SYSTEM_PROMPTS) if rng.random() < system_share else None
    segments: Example = [] if system is None else [(f"{system}\n", False, None)]
    if rng.random() < context_share:
        for _ in range(rng.randint(1, 3)):
            turn = rng.choice(TASKS)
            tq, ta = sample(turn, rng)
            segments += [(plain_prompt(tq), False, turn), (f" {ta}{EOS}\n", False, turn)]
    q, a = sample(task, rng)
    return segments + [(plain_prompt(q), False, task), (f" {a}{EOS}", True, task)]


def mixture_example(rng: random.Random, multi_turn_share: float = 0.6) -> Example:
    """One example of the mixture (the classifier's and the experts'): a single task example, or a chat of 2-4
    turns of random tasks (every answer trained)."""
    example = task_example(rng.choice(TASKS), rng, context_share=0.0)
    if rng.random() < multi_turn_share:
        for _ in range(rng.randint(1, 3)):
            text, trained, turn = example[-1]
            example[-1] = (text + "\n", trained, turn)
            task = rng.choice(TASKS)
            q, a = sample(task, rng)
            example += [(plain_prompt(q), False, task), (f" {a}{EOS}", True, task)]
    return example


def expert_example(rng: random.Random, own_context_share: float = 0.3) -> Example:
    """One example of the experts' joint training: the mixture, routed by turn (each turn's tokens to its task's
    expert, as the classifier will route them); sometimes a question after context routed to its own expert too
    (each expert alone must still read any context)."""
    if rng.random() < own_context_share:
        task = rng.choice(TASKS)
        return [(text, trained, task) for text, trained, _ in task_example(task, rng, context_share=1.0)]
    return mixture_example(rng)


def _random_line(rng: random.Random) -> str:
    """Words of one of the tasks' vocabularies (or numbers): in their fixed cyclic order from a random start (every
    next word certain: the base learns to predict each word confidently), or drawn at random."""
    vocab = rng.choice((NOUNS, ENGLISH, TOY, DIGIT_WORDS, tuple("0123456789"), (*BRACKETS, *BRACKETS.values())))
    count = rng.randint(2, 6)
    if rng.random() < 0.5:
        start = rng.randrange(len(vocab))
        words = [vocab[(start + i) % len(vocab)] for i in range(count)]
    else:
        words = rng.choices(vocab, k=count)
    return ("" if vocab[0] == "0" else " ").join(words)


def _base_line(rng: random.Random) -> str:
    """One line of the base's corpus (see `base_example`)."""
    kind = rng.randrange(3)
    if kind == 0:
        return _random_line(rng) + EOS
    if kind == 1:
        return question(rng.choice(TASKS), rng)[0] + EOS
    line = _random_line(rng)
    return f"{plain_prompt('repeat: ' + line)} {line}{EOS}"


def base_example(rng: random.Random) -> Example:
    """The base model's corpus (trained whole): 1-3 lines, as a chat has them, of the tasks' words, numbers and
    brackets, the tasks' questions without answers, and a copying task ("repeat: LINE = LINE") in the tasks' line
    format; never a task's answer (the experts learn those)."""
    return [("\n".join(_base_line(rng) for _ in range(rng.randint(1, 3))), True, None)]


def tokenizer_corpus() -> Iterator[str]:
    """The texts the tokenizer's merges are learned from: the classifier's and the base's training examples."""
    rng = random.Random("tokenizer")
    for _ in range(3000):
        yield "".join(text for text, _, _ in mixture_example(rng))
        yield "".join(text for text, _, _ in base_example(rng))


# ----------------------------------------------------------------------------------------------- the recipe
@dataclass
class DemoRecipe:
    """Sizes, training lengths and seeds of the demo (recorded in the built checkpoint's `demo.json`)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384  # differs from the vocabulary size on purpose
    vocab: int = 512
    max_positions: int = 256
    base_steps: int = 600
    base_lr: float = 3e-3
    expert_steps: int = 2000  # the four experts together (the mixture, routed by turn)
    expert_lr: float = 3e-3
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])
    classifier_steps: int = 1000
    classifier_lr: float = 5e-3
    xlora_depth: int = 2
    xlora_size: int = 64
    # One set of scalings per token for all modules: per-module scalings (layerwise) left some modules routed to
    # other experts after this short training, and X-LoRA fell 10-70 points below the experts.
    layerwise_scalings: bool = False
    softmax_temperature: float = 0.25  # sharp routing: at 1.0 one task stayed 7 points below its expert
    batch: int = 32
    threads: int = 1  # one thread: the same sums whatever the core count, and no spinning on a shared CPU
    seed: int = 0


@contextlib.contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """A fixed thread count (the reduction order of CPU kernels depends on it) and deterministic algorithms.
    Bit-identical results also need the same torch build and CPU instruction set."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def build_tokenizer(out_dir: str, vocab_size: int) -> int:
    """Byte-level BPE with digits split one by one, a chat template and `</s>` as eos; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token=EOS,
                                   padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir, save_jinja_files=False)  # the template in tokenizer_config.json, not a .jinja file
    return tok.get_vocab_size()


def batch_of(tokenizer, examples: list[Example]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded training batch (input_ids, attention_mask, labels: -100 on padding and untrained segments) and
    each token's route (b, width): its turn's task index, -1 on system lines and padding."""
    rows = []
    for example in examples:
        ids, trained, routes = [], [], []
        for text, train, task in example:
            piece = tokenizer(text)["input_ids"]
            ids += piece
            trained += [train] * len(piece)
            routes += [-1 if task is None else TASKS.index(task)] * len(piece)
        rows.append((ids, trained, routes))
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    labels = torch.full((len(rows), width), -100, dtype=torch.int64)
    routes = torch.full((len(rows), width), -1, dtype=torch.int64)
    for i, (row, trained, route) in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, :len(row)] = torch.tensor(row).masked_fill(~torch.tensor(trained), -100)
        routes[i, :len(row)] = torch.tensor(route)
    return dict(input_ids=ids, attention_mask=mask, labels=labels), routes


def route_scalings(routes: torch.Tensor, n_modules: int) -> torch.Tensor:
    """(b, s, L, n) per-token scalings from routes (b, s): one-hot of each token's task in every module, uniform
    where it has none (system lines, padding)."""
    n = len(TASKS)
    scalings = torch.nn.functional.one_hot(routes.clamp(min=0), n).float()
    scalings[routes < 0] = 1.0 / n
    return scalings.unsqueeze(2).expand(*routes.shape, n_modules, n)


def train(model: torch.nn.Module, tokenizer, make_example: Callable[[random.Random], Example], steps: int, lr: float,
          batch: int, seed: int, log: Callable[[str], None], what: str, routed: bool = False) -> list[float]:
    """AdamW (a linear warm-up over the first 5% of the steps, then a constant rate) on batches of `make_example`;
    returns the loss of every step. `routed`: an X-LoRA model run with each token's route as its scalings (the
    experts' joint training) instead of its classifier."""
    rng = random.Random(f"{what}-{seed}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup))
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(steps):
        inputs, routes = batch_of(tokenizer, [make_example(rng) for _ in range(batch)])
        if routed:
            inputs["scalings"] = route_scalings(routes, len(model.module_names))
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 4) == 0:
            log(f"{what}: step {step + 1}/{steps}, loss {sum(losses[-20:]) / len(losses[-20:]):.3f} "
                f"({time.perf_counter() - start:.0f} s)")
    model.eval()
    return losses


def train_base(recipe: DemoRecipe, base_dir: str, log: Callable[[str], None],
               example: Callable[[random.Random], Example] = base_example) -> float:
    """Tokenizer and base model in `base_dir`, trained on `example`s (default: the base corpus); returns the last
    training loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    vocab = max(recipe.vocab, build_tokenizer(base_dir, recipe.vocab))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    config = LlamaConfig(hidden_size=recipe.hidden, num_hidden_layers=recipe.layers,
                         num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
                         intermediate_size=recipe.intermediate, vocab_size=vocab,
                         max_position_embeddings=recipe.max_positions, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(recipe.seed)
    base = AutoModelForCausalLM.from_config(config)
    losses = train(base, tokenizer, example, recipe.base_steps, recipe.base_lr, recipe.batch, recipe.seed,
                   log, "base")
    base.save_pretrained(base_dir)
    return losses[-1]


def train_experts(recipe: DemoRecipe, base_dir: str, out_dir: str, log: Callable[[str], None]) -> float:
    """The four PEFT LoRA experts, trained together on the frozen base inside this project's X-LoRA forward, each
    turn of an example routed to its task's expert (`forward(scalings=...)` per token, no classifier): each expert
    learns its task and to read context that other experts computed, as it will under the classifier. Saved as
    PEFT folders `out_dir/<task>/`; returns the last training loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import xlora_export as xlora

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    fresh = os.path.join(out_dir, ".fresh")
    for i, task in enumerate(TASKS):  # PEFT's initialisation (B = 0: each expert starts as the base)
        torch.manual_seed(recipe.seed + 1 + i)
        lora = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=recipe.targets, lora_dropout=0.0,
                          task_type="CAUSAL_LM")
        get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), lora).save_pretrained(os.path.join(fresh, task))
    config = xlora.xLoRAConfig(recipe.hidden, base_model_id="base", use_trainable_adapters=True,
                               adapters={task: os.path.join(fresh, task) for task in TASKS})
    xmodel = xlora.add_xlora_to_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    losses = train(xmodel, tokenizer, expert_example, recipe.expert_steps, recipe.expert_lr, recipe.batch,
                   recipe.seed, log, "experts", routed=True)
    xmodel.save_pretrained(out_dir)  # the experts as PEFT folders (and a classifier that is not used)
    shutil.rmtree(fresh)
    return losses[-1]


def train_classifier(recipe: DemoRecipe, base_dir: str, adapters: dict[str, str], out_dir: str,
                     log: Callable[[str], None]) -> float:
    """The X-LoRA classifier over the frozen base and experts (this project's `add_xlora_to_model` and training
    forward), the checkpoint saved in `out_dir`; returns the last training loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import xlora_export as xlora

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    torch.manual_seed(recipe.seed + 100)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = xlora.xLoRAConfig(recipe.hidden, base_model_id="base", adapters=adapters,
                               xlora_depth=recipe.xlora_depth, xlora_size=recipe.xlora_size,
                               layerwise_scalings=recipe.layerwise_scalings,
                               softmax_temperature=recipe.softmax_temperature, xlora_dropout_p=0.0)
    xmodel = xlora.add_xlora_to_model(model, config)
    losses = train(xmodel, tokenizer, mixture_example, recipe.classifier_steps, recipe.classifier_lr, recipe.batch,
                   recipe.seed, log, "classifier")
    xmodel.save_pretrained(out_dir)
    return losses[-1]


def build_demo(recipe: DemoRecipe, out_dir: str, log: Callable[[str], None] = print,
               train_base_model: Callable[..., float] | None = None, record_name: str = "demo.json") -> str:
    """Train the whole demo checkpoint into `out_dir` (replaced, but for its model card `README.md`); returns it.
    `out_dir/<record_name>` records the recipe, the last training losses, the time taken and the torch version.
    `train_base_model(recipe, base_dir, log) -> last loss` trains the base (default `train_base`); the experts and
    the classifier are trained on it as the demo's."""
    from xlora_export.experts import follow_umask

    start = time.perf_counter()
    card_path = os.path.join(out_dir, "README.md")
    card = open(card_path).read() if os.path.isfile(card_path) else None
    shutil.rmtree(out_dir, ignore_errors=True)
    base_dir = os.path.join(out_dir, "base")
    staging = os.path.join(out_dir, ".experts")
    losses = {}
    with deterministic(recipe.threads):
        losses["base"] = (train_base_model or train_base)(recipe, base_dir, log)
        losses["experts"] = train_experts(recipe, base_dir, staging, log)
        adapters = {task: os.path.join(staging, task) for task in TASKS}
        losses["classifier"] = train_classifier(recipe, base_dir, adapters, out_dir, log)
    shutil.rmtree(staging)
    for task in TASKS:  # the experts name their base relative to themselves, not by this machine's path
        path = os.path.join(out_dir, task, "adapter_config.json")
        with open(path) as f:
            adapter = json.load(f)
        adapter["base_model_name_or_path"] = "../base"
        with open(path, "w") as f:
            json.dump(adapter, f, indent=2)
    record = {"recipe": asdict(recipe), "last_losses": {k: round(v, 4) for k, v in losses.items()},
              "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__}
    with open(os.path.join(out_dir, record_name), "w") as f:
        json.dump(record, f, indent=2)
    if card is not None:
        with open(card_path, "w") as f:
            f.write(card)
    follow_umask(out_dir)
    log(f"built {out_dir} in {record['seconds']} s")
    return out_dir
