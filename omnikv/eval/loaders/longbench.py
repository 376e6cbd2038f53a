"""LongBench (v1) and LongBench-E from the official JSONL files.

Files: `<dataset>.jsonl` (LongBench) or `<dataset>_e.jsonl` (LongBench-E), one record per line with
the official fields `input`, `context`, `answers` (list), `length`, `dataset`, `language`,
`all_classes`, `_id`. Prompt templates, generation lengths and metrics are LongBench's; the prompt
is truncated in the middle to `max_length` tokens. Prompts are raw (no chat template); LongBench
applies a chat template to chat models except for trec / triviaqa / samsum / lsht / lcc /
repobench-p.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnikv.errors import ConfigError
from omnikv.eval.loaders.common import find_file, read_records, require, truncate_middle
from omnikv.eval.tasks.base import Sample

_QA_HOTPOT = ("Answer the question based on the given passages. Only give me the answer and do not output "
              "any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based "
              "on the given passages. Only give me the answer and do not output any other words.\n\n"
              "Question: {input}\nAnswer:")

PROMPTS: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer "
                   "the question asconcisely as you can, using a single phrase if possible. Do not provide any "
                   "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story asconcisely "
                   "as you can, using a single phrase if possible. Do not provide any explanation.\n\n"
                   "Question: {input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, "
              "using a single phrase or sentence if possible. If the question cannot be answered based on the "
              "information in the article, write \"unanswerable\". If the question is a yes/no question, answer "
              "\"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n "
              "Answer the question based on the above article as concisely as you can, using a single phrase or "
              "sentence if possible. If the question cannot be answered based on the information in the article, "
              "write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
              "\"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following "
                       "question based on the above text, only give me the answer and do not output any other "
                       "words.\n\nQuestion: {input}\nAnswer:",
    "multifieldqa_zh": "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，"
                       "不要输出任何其他字词。\n\n问题：{input}\n回答：",
    "hotpotqa": _QA_HOTPOT,
    "2wikimqa": _QA_HOTPOT,
    "musique": _QA_HOTPOT,
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
                  "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the "
             "query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the "
             "above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n"
                  "{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n"
            "{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any "
                "other words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
              "{context}\n\n{input}",
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. "
                     "Please carefully read these paragraphs and determine how many unique paragraphs there are "
                     "after removing duplicates. In other words, how many non-repeating paragraphs are there in "
                     "total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing "
                     "duplicates. The output format should only contain the number, such as 1, 2, 3, and so on."
                     "\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine "
                            "which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract."
                            "\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. "
                            "The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\n"
                            "The answer is: ",
    "passage_retrieval_zh": "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n"
                            "下面是一个摘要\n\n{input}\n\n请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式"
                            "\n\n答案是：",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}

METRIC: dict[str, str] = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1", "2wikimqa": "qa_f1", "musique": "qa_f1", "dureader": "rouge_l_zh",
    "gov_report": "rouge_l", "qmsum": "rouge_l", "multi_news": "rouge_l", "vcsum": "rouge_l_zh",
    "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge_l", "lsht": "classification",
    "passage_count": "count", "passage_retrieval_en": "retrieval", "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim", "repobench-p": "code_sim",
}

# Few-shot tasks: LongBench scores only the first line of the output.
FIRST_LINE_ONLY = frozenset({"trec", "triviaqa", "samsum", "lsht"})

LONGBENCH_E_DATASETS: tuple[str, ...] = (
    "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
    "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)

_SUBDIRS = ("", "data", "LongBench/data", "longbench/data", "LongBench", "longbench")


def length_bucket(words: int) -> str:
    """LongBench-E length bucket of a record's `length` field."""
    return "0-4k" if words < 4000 else "4-8k" if words < 8000 else "8k+"


def load_longbench(
    data_dir: str | Path, dataset: str, tokenizer: Any, max_length: int, n_samples: int | None = None,
    *, variant: str = "v1",
) -> list[Sample]:
    """Samples of one LongBench dataset (`variant="e"`: LongBench-E), prompts middle-truncated to
    `max_length` tokens. `n_samples` keeps the first n records."""
    if dataset not in PROMPTS:
        raise ConfigError(f"unknown LongBench dataset {dataset!r}; choose one of {', '.join(PROMPTS)}")
    if variant == "e" and dataset not in LONGBENCH_E_DATASETS:
        raise ConfigError(f"{dataset!r} is not in LongBench-E; choose one of {', '.join(LONGBENCH_E_DATASETS)}")
    fname = f"{dataset}_e.jsonl" if variant == "e" else f"{dataset}.jsonl"
    path = find_file(data_dir, [fname], _SUBDIRS, "LongBench-E" if variant == "e" else "LongBench")
    task = f"longbench-e:{dataset}" if variant == "e" else f"longbench:{dataset}"
    samples = []
    for i, rec in enumerate(read_records(path, n_samples)):
        require(rec, ("input", "context", "answers"), f"{path} record {i}")
        prompt, truncated = truncate_middle(tokenizer, PROMPTS[dataset].format(**rec), max_length)
        meta = dict(dataset=dataset, language=rec.get("language"), all_classes=rec.get("all_classes"),
                    length_words=rec.get("length"), truncated=truncated, max_length=max_length,
                    first_line_only=dataset in FIRST_LINE_ONLY)
        if variant == "e" and rec.get("length") is not None:
            meta["length_bucket"] = length_bucket(int(rec["length"]))
        samples.append(Sample(
            id=str(rec.get("_id", i)), task=task, prompt=prompt, answers=[str(a) for a in rec["answers"]],
            metric=METRIC[dataset], max_new_tokens=MAX_NEW_TOKENS[dataset], metadata=meta,
        ))
    return samples
