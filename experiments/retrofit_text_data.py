"""Free-text distillation data for the stick-breaking retrofit: the *teacher* (the softmax source) writes documents of
many kinds from short openings written here, sampled from its own distribution. Matching the teacher on its own text
spreads the retrofit beyond the one novel and the chat it otherwise trains on, without any outside text.

The openings are built from the lists below (deterministic; sampling is seeded). None quotes or names a held-out text
of experiments/retrofit_eval.py, and none mentions a chat-probe answer (`retrofit_chat_data.check_held_out`).

    python experiments/retrofit_text_data.py --out out/retrofit/teacher_text.txt [--max-new-tokens 320]
"""

import torch

from retrofit_chat_data import teacher_data_main

# (kind of document, opening lines): the teacher continues each opening once per subject.
KINDS = [
    ("encyclopedia", "{subject}\n\n{Subject} is"),
    ("news", "LOCAL NEWS\n\nOfficials said on Tuesday that {subject}"),
    ("letter", "Dear friend,\n\nI write to tell you about {subject}."),
    ("lecture", "Good afternoon. Today's lecture is about {subject}. Let us begin"),
    ("history", "A short history of {subject}\n\nIn the early years,"),
    ("manual", "Chapter 2. Working with {subject}\n\n2.1 Overview\n\n"),
    ("story", "Once upon a time, in a village famous for {subject},"),
    ("sermon", "A sermon on {subject}\n\nBrethren, consider"),
    ("review", "Book review: a new study of {subject}\n\nThis"),
    ("dialogue", "TEACHER: What do you know about {subject}?\nSTUDENT:"),
    ("essay", "On {subject}\n\nIt has often been said that"),
    ("code", "# Notes on {subject}, with a small program\n\ndef main():\n"),
]
SUBJECTS = ["the printing press", "bees", "the steam engine", "ancient Greece", "rivers", "clocks", "bread",
            "the telegraph", "sailing ships", "vaccination", "trade routes", "mathematics", "bridges", "maps",
            "the postal service", "medicine", "forests", "glass", "coffee", "electric light", "wool", "paper money",
            "the weather", "railways", "castles", "prime numbers", "the human eye", "libraries", "farming",
            "sorting algorithms", "file systems", "networks", "the moon", "salt", "music theory", "kings and queens"]


def build_openings() -> list[str]:
    """One opening per (kind, subject) pair on a diagonal walk, so every kind meets every third subject."""
    openings = []
    for k, (_, template) in enumerate(KINDS):
        for s, subject in enumerate(SUBJECTS):
            if (s + k) % 3 == 0:
                openings.append(template.format(subject=subject, Subject=subject[0].upper() + subject[1:]))
    return openings


@torch.no_grad()
def teacher_documents(model, tokenizer, openings: list[str], max_new_tokens: int, batch_size: int = 48,
                      seed: int = 0) -> list[str]:
    """Each opening continued by `model` (sampled at temperature 0.8, top-p 0.95); documents are separated by a blank
    line (many are cut by `max_new_tokens`: no end-of-turn token is added, so the student is not taught to stop)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    documents = []
    for start in tqdm(range(0, len(openings), batch_size), desc="teacher documents"):
        batch = openings[start : start + batch_size]
        inputs = tokenizer(batch, return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_p=0.95,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        for opening, row in zip(batch, out[:, inputs["input_ids"].shape[1] :]):
            documents.append(opening + tokenizer.decode(row, skip_special_tokens=True).rstrip() + "\n\n\n")
    return documents


def main(argv=None):
    teacher_data_main(argv, __doc__, build_openings(), teacher_documents, 320, "documents")


if __name__ == "__main__":
    main()
