"""Chat distillation data for the stick-breaking retrofit: the *teacher* (the softmax source) answers a varied set of
prompts written here, and the conversations, rendered with the tokenizer's chat template, become training text on
which the student matches the teacher's token distributions. No outside chat data is needed.

The prompts are built from the word lists below (deterministic); none mentions a subject of the chat probe
(`data/chat/probe.json`, checked by `check_held_out`), which stays a held-out test.

    python experiments/retrofit_chat_data.py --out out/retrofit/teacher_chats.txt [--max-new-tokens 96]
"""

import argparse
import json
import os
import re

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PROBE = os.path.join(ROOT, "data", "chat", "probe.json")

COUNTRIES = ["Canada", "Australia", "India", "China", "Russia", "Mexico", "Argentina", "Kenya", "Nigeria", "Sweden",
             "Norway", "Poland", "Greece", "Portugal", "Turkey", "Thailand", "Vietnam", "Peru", "Chile", "Ireland",
             "Austria", "Belgium", "the Netherlands", "Switzerland", "Denmark", "Finland", "South Korea", "Indonesia",
             "Morocco", "Cuba", "Hungary", "Ukraine", "New Zealand", "Colombia", "Iran", "Pakistan"]
CONCEPTS = ["gravity", "electricity", "a black hole", "democracy", "inflation", "a computer virus", "the internet",
            "machine learning", "a volcano", "an earthquake", "the immune system", "DNA", "a rainbow", "evolution",
            "the stock market", "a vaccine", "climate change", "renewable energy", "a recipe", "friction", "magnetism",
            "an atom", "a cell", "the water cycle", "recycling", "a budget", "a metaphor", "a noun", "a verb",
            "an algorithm", "a database", "cloud computing", "a calendar", "the moon's phases", "tides", "sound",
            "light", "a telescope", "a microscope", "a battery", "an engine", "an election", "a library", "a museum",
            "the Olympic Games", "a haiku", "a sonnet", "a novel", "a symphony", "chess", "a bicycle", "a bridge",
            "nutrition", "sleep", "exercise", "meditation", "a habit", "kindness", "patience", "curiosity"]
THINGS = ["the ocean", "autumn leaves", "a city at night", "a cup of tea", "a rainy day", "friendship", "a cat",
          "a dog", "the mountains", "winter", "a garden", "a train journey", "the stars", "a lighthouse", "an old book",
          "a thunderstorm", "morning coffee", "a river", "a forest", "snow", "a birthday", "music", "home", "the wind"]
ACTIVITIES = ["studying for an exam", "learning to cook", "staying healthy", "saving money", "writing an essay",
              "making new friends", "learning a language", "running a first marathon", "keeping a plant alive",
              "sleeping better", "starting a small business", "giving a speech", "travelling on a budget",
              "working from home", "learning to code", "taking good photos", "reducing stress", "reading more books",
              "organising a desk", "preparing for a job interview", "learning to swim", "planning a trip"]
TASKS = ["boil an egg", "write a thank-you note", "change a flat tyre", "make a cup of tea", "plant a tree",
         "tie a tie", "back up my files", "make pancakes", "clean a laptop screen", "start a journal",
         "set a weekly goal", "write a good email subject line", "fold a paper airplane", "learn to juggle",
         "make a simple budget", "brew coffee without a machine", "stretch before running", "wash a wool sweater"]
CHARACTERS = ["a young inventor", "an old fisherman", "a curious robot", "a lonely dragon", "a brave mouse",
              "a shy painter", "a clever fox", "a lost astronaut", "a kind baker", "a travelling musician"]
EVENTS = ["finds a mysterious key", "learns to fly", "makes an unlikely friend", "gets lost in a storm",
          "discovers a hidden garden", "wins a contest", "opens a small shop", "solves a puzzle"]
BOOKS = [("Pride and Prejudice", "novel"), ("Moby-Dick", "novel"), ("The Odyssey", "epic poem"),
         ("Hamlet", "play"), ("Don Quixote", "novel"), ("Frankenstein", "novel"), ("War and Peace", "novel"),
         ("The Divine Comedy", "poem"), ("Great Expectations", "novel"), ("The Republic", "dialogue")]
CHAT = ["Hi!", "Hello, how are you today?", "Can you help me with something?", "Tell me a joke.",
        "Thank you for your help!", "What can you do?", "Good morning!", "I am bored. Any ideas?",
        "Tell me a fun fact.", "What should I cook for dinner tonight?", "Can you recommend a good book?",
        "I feel tired today.", "Say something nice.", "What is your name?", "Who made you?",
        "Give me a riddle.", "What is a good name for a pet goldfish?", "How do you say hello in three languages?"]


def build_prompts() -> list[str]:
    prompts = [f"What is the capital of {c}?" for c in COUNTRIES]
    prompts += [f"Which continent is {c} in?" for c in COUNTRIES[::3]]
    for i, concept in enumerate(CONCEPTS):
        prompts += [f"What is {concept}?", f"Explain {concept} in simple terms."]
        if i % 3 == 0:
            prompts.append(f"Give me one sentence about {concept}.")
    prompts += [f"Write a short poem about {t}." for t in THINGS]
    prompts += [f"Describe {t} in two sentences." for t in THINGS[::2]]
    prompts += [f"Give me three tips for {a}." for a in ACTIVITIES]
    prompts += [f"How do I {t}?" for t in TASKS]
    prompts += [f"Write a short story about {c} who {e}." for i, c in enumerate(CHARACTERS)
                for j, e in enumerate(EVENTS) if (i + j) % 4 == 0]
    prompts += [f"Who wrote {title}?" for title, _ in BOOKS]
    prompts += [f"What is {title} about?" for title, _ in BOOKS]
    numbers = [(3, 4), (9, 6), (11, 13), (20, 22), (14, 17), (5, 9), (31, 8), (40, 25), (6, 6), (18, 2)]
    prompts += [f"What is {a} plus {b}?" for a, b in numbers]
    prompts += [f"What is {a} times {b}?" for a, b in numbers[:6]]
    prompts += [f"Is {n} an even or an odd number?" for n in (13, 22, 37, 48, 91)]
    prompts += CHAT
    return prompts


def probe_subjects() -> list[str]:
    """The words a distillation prompt must not contain: every probe answer of four or more letters."""
    with open(PROBE, encoding="utf-8") as f:
        questions = json.load(f)["questions"]
    return sorted({a for q in questions for a in q["answers"] if len(a) >= 4 and a.isalpha()})


def check_held_out(prompts: list[str]) -> None:
    with open(PROBE, encoding="utf-8") as f:
        probe = {q["q"].lower() for q in json.load(f)["questions"]}
    for prompt in prompts:
        if prompt.lower() in probe:
            raise ValueError(f"distillation prompt {prompt!r} is a chat-probe question")
        for word in probe_subjects():
            if re.search(rf"\b{re.escape(word)}\b", prompt, re.IGNORECASE):
                raise ValueError(f"distillation prompt {prompt!r} mentions the probe answer {word!r}")


@torch.no_grad()
def teacher_conversations(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 48) -> list[str]:
    """Greedy answers of `model`, each rendered as one full conversation by the chat template."""
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"
    conversations = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="teacher answers"):
        batch = [[{"role": "user", "content": p}] for p in prompts[start : start + batch_size]]
        texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in batch]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        for messages, row in zip(batch, out[:, inputs["input_ids"].shape[1] :]):
            answer = tokenizer.decode(row, skip_special_tokens=True).strip()
            # An answer cut by max_new_tokens is kept as it is (no end-of-turn), so the student is not taught to stop.
            finished = tokenizer.eos_token_id in row.tolist() or tokenizer.convert_tokens_to_ids("<|im_end|>") in row.tolist()
            text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
            conversations.append(text if finished else text.rsplit("<|im_end|>", 1)[0])
    return conversations


def load_teacher(threads: int | None = None):
    """The source as it is (the SmolLM2 GGUF, softmax, float32, eval mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_attn_variants.testing import require_smollm2_gguf

    if threads:
        torch.set_num_threads(threads)
    folder, name = require_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer


def teacher_data_main(argv, doc: str, prompts: list[str], generate, default_max_new_tokens: int, what: str) -> None:
    """The command line both teacher-data scripts share: check the prompts against the probe, let the teacher write,
    write the text file at once (a staging file, then a rename)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", required=True, help=f"text file to write (the {what}, one after another)")
    parser.add_argument("--max-new-tokens", type=int, default=default_max_new_tokens)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    check_held_out(prompts)
    model, tokenizer = load_teacher(args.threads)
    texts = generate(model, tokenizer, prompts, args.max_new_tokens)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    partial = args.out + ".partial"
    with open(partial, "w", encoding="utf-8") as f:
        f.write("".join(texts))
    os.replace(partial, args.out)
    print(f"{len(texts)} teacher {what} -> {args.out}")


def main(argv=None):
    teacher_data_main(argv, __doc__, build_prompts(), teacher_conversations, 96, "conversations")


if __name__ == "__main__":
    main()
