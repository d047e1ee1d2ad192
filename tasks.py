"""Verifiable tasks: prompt formatting, answer extraction and rewards (MedQA/MedMCQA/PubMedQA, GSM8K, synthetic)."""

LETTERS = "ABCDEFGHIJ"


def format_mcq(question, options):
    """The one multiple-choice layout used for pretraining text and GRPO prompts alike; ends with 'Answer:'."""
    lines = [f"Question: {question.strip()}"]
    lines += [f"{k}. {str(v).strip()}" for k, v in options.items()]
    return "\n".join(lines) + "\nAnswer:"
