"""Emergent-misalignment evaluation: questions, judges (OpenAI-compatible API or a local model), scoring rules,
and a resumable sample -> judge -> summarise loop."""

from emjax.eval.aggregate import aggregate, classify, summarize
from emjax.eval.judge import (Judge, JudgeAPIError, JudgeCache, LocalJudge, OpenAIJudge, chat_prompt_ids,
                              format_judge_prompt, parse_top_logprobs, render_chat, score_answers,
                              score_from_probs, verdict_from_probs)
from emjax.eval.questions import (DEFAULT_SETS, QUESTION_SETS, Question, QuestionFileError, fetch_questions,
                                  load_questions)
from emjax.eval.run import EvalInterrupted, evaluate, summarize_dir

__all__ = [
    "aggregate", "classify", "summarize", "Judge", "JudgeAPIError", "JudgeCache", "LocalJudge", "OpenAIJudge",
    "chat_prompt_ids", "format_judge_prompt", "parse_top_logprobs", "render_chat", "score_answers",
    "score_from_probs", "verdict_from_probs", "DEFAULT_SETS", "QUESTION_SETS", "Question", "QuestionFileError",
    "fetch_questions", "load_questions", "EvalInterrupted", "evaluate", "summarize_dir",
]
