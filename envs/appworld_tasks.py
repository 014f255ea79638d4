"""Offline AppWorld task generator: builds a handful of small tasks through AppWorld's own APIs.

AppWorld's task data (specs, DBs, ground truth, API docs) is downloaded from S3 and is not reachable offline, and its
app sources may only be redistributed encrypted. So tests and CPU smoke runs use tasks **built at setup time** by
this file, executed with the AppWorld venv's python (``<venv>/bin/python appworld_tasks.py --root DIR``)::

    python -m verl_hindsight.envs.appworld_server generate-tasks [--root DIR]

Nothing generated is committed: the DBs, the API docs and the ground truth are written under ``DIR/data``
(default ``<venv>/generated-root``) from the decrypted app code of the installed package.

How a task is built (only public AppWorld APIs):
- ``ModelCollection.load(":memory:...", load_apps=all apps, create_db=True)``, then ``Model.create_save(...)`` for the
  admin ``MainUser`` (the supervisor) with an ``AccountPassword`` per app, the supervisor app's ``Supervisor``,
  ``AccountPassword`` and ``Task`` rows, app data (simple_note ``User``/``Note``, todoist ``User``/``Project``/``Task``)
  and ``api_docs.ApiDoc`` rows from ``appworld.api_docs.prepare_api_docs(app)``;
- ``data/api_docs/standard/<app>.json`` from the same docs (with AppWorld's canary string);
- ``appworld.task.Task(...).save(model_collection_format="full")`` and ``GroundTruth(...).save()`` with an
  ``evaluation.py`` whose tests (``with test("...")``) compare the end DB state and the answer.

Each task also stores its oracle (a list of code actions, one per turn) and a wrong solution in
``DIR/verl_hindsight_tasks.json``; the environment adapter reads it for ``oracle_action()``.

The top of this module is stdlib only so the training venv can import it for :data:`TASKS` and the file names.
"""

from __future__ import annotations

import json
import os
import sys
from textwrap import dedent

TASKS_FILE = "verl_hindsight_tasks.json"
GENERATOR_VERSION = 1
DATE_TIME = "2023-05-18T12:00:00"

SUPERVISOR = {"first_name": "Ada", "last_name": "Lovelace", "email": "ada@example.com",
              "phone_number": "5550100", "birthday": "1990-12-10", "sex": "female"}
NOTE_PASSWORD = "notes-pass-1"
TODO_PASSWORD = "todo-pass-1"

_LOGIN_NOTE = (
    "pw = [a for a in apis.supervisor.show_account_passwords() if a['account_name'] == 'simple_note'][0]['password']\n"
    "tok = apis.simple_note.login(username='ada@example.com', password=pw)['access_token']\n"
    "print('logged in')"
)
_LOGIN_TODO = (
    "pw = [a for a in apis.supervisor.show_account_passwords() if a['account_name'] == 'todoist'][0]['password']\n"
    "tok = apis.todoist.login(username='ada@example.com', password=pw)['access_token']\n"
    "print('logged in')"
)
_ALL_NOTES = (
    "notes = []\n"
    "page = 0\n"
    "while True:\n"
    "    batch = apis.simple_note.search_notes(access_token=tok, page_index=page, page_limit=20)\n"
    "    if not batch:\n"
    "        break\n"
    "    notes += batch\n"
    "    page += 1\n"
    "print([n['title'] for n in notes])"
)

NOTES = [
    # (title, content, tags)
    ("Groceries", "milk, eggs, bread", ["home"]),
    ("Gym plan", "legs on monday, arms on thursday", ["health"]),
    ("Book list", "Dune; Neuromancer; Foundation", ["reading", "home"]),
    ("Trip ideas", "Lisbon in spring, Oslo in winter", ["travel"]),
    ("Recipes", "pancakes: flour, milk, eggs", ["home", "food"]),
]

# Each task: instruction, kind (what the evaluation checks), oracle code actions, a wrong solution, split.
TASKS = [
    {
        "id": "hsnote_1", "split": "train", "app": "simple_note", "kind": "count_tag", "tag": "home",
        "instruction": "How many of my Simple Note notes are tagged 'home'?",
        "oracle": [_LOGIN_NOTE, _ALL_NOTES,
                   "apis.supervisor.complete_task(answer=len([n for n in notes if 'home' in n['tags']]))"],
        "wrong": [_LOGIN_NOTE, "apis.supervisor.complete_task(answer=1)"],
    },
    {
        "id": "hsnote_2", "split": "train", "app": "simple_note", "kind": "add_tag", "title": "Gym plan",
        "tag": "urgent",
        "instruction": "Add the tag 'urgent' to my Simple Note note titled 'Gym plan', keeping its other tags.",
        "oracle": [_LOGIN_NOTE, _ALL_NOTES,
                   "n = [n for n in notes if n['title'] == 'Gym plan'][0]\n"
                   "apis.simple_note.update_note(access_token=tok, note_id=n['note_id'], tags=n['tags'] + ['urgent'])",
                   "apis.supervisor.complete_task()"],
        "wrong": [_LOGIN_NOTE, _ALL_NOTES,
                  "n = [n for n in notes if n['title'] == 'Gym plan'][0]\n"
                  "apis.simple_note.update_note(access_token=tok, note_id=n['note_id'], tags=['urgent'])",
                  "apis.supervisor.complete_task()"],
    },
    {
        "id": "hsnote_3", "split": "val", "app": "simple_note", "kind": "create_note", "title": "Packing list",
        "content": "passport, charger, socks",
        "instruction": "Create a Simple Note note titled 'Packing list' with the content 'passport, charger, socks'.",
        "oracle": [_LOGIN_NOTE,
                   "apis.simple_note.create_note(access_token=tok, title='Packing list', "
                   "content='passport, charger, socks')",
                   "apis.supervisor.complete_task()"],
        "wrong": [_LOGIN_NOTE,
                  "apis.simple_note.create_note(access_token=tok, title='Packing', content='passport')",
                  "apis.supervisor.complete_task()"],
    },
    {
        "id": "hsnote_4", "split": "val", "app": "simple_note", "kind": "delete_note", "title": "Trip ideas",
        "instruction": "Delete my Simple Note note titled 'Trip ideas' and nothing else.",
        "oracle": [_LOGIN_NOTE, _ALL_NOTES,
                   "n = [n for n in notes if n['title'] == 'Trip ideas'][0]\n"
                   "apis.simple_note.delete_note(access_token=tok, note_id=n['note_id'])",
                   "apis.supervisor.complete_task()"],
        "wrong": [_LOGIN_NOTE, "apis.supervisor.complete_task()"],
    },
    {
        "id": "hstodo_1", "split": "train", "app": "todoist", "kind": "todo_count",
        "instruction": "How many projects do I have in Todoist?",
        "oracle": [_LOGIN_TODO,
                   "projects = apis.todoist.show_projects(access_token=tok, page_limit=50)\nprint([p['name'] for p in projects])",
                   "apis.supervisor.complete_task(answer=len(projects))"],
        "wrong": [_LOGIN_TODO, "apis.supervisor.complete_task(answer=7)"],
    },
]

TODO_PROJECTS = ["Home", "Work", "Garden"]


def load_tasks_file(root: str) -> dict:
    with open(os.path.join(root, TASKS_FILE)) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------------
# Everything below runs inside the AppWorld venv (python >= 3.11, appworld==0.1.3.post1 installed and `installed`).
# ----------------------------------------------------------------------------------------------------------------

def _evaluation_code(task: dict) -> str:
    kind = task["kind"]
    head = dedent('''
        def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    ''').lstrip("\n")
    if kind in ("count_tag", "todo_count"):
        body = '''
            with test("""the task is marked complete with status 'success'"""):
                task_row = models.end.supervisor.Task.all()[0]
                test.case(task_row.status, "==", "success")
            with test("""the answer given to complete_task is the right count"""):
                test.answer(json.loads(models.end.supervisor.Task.all()[0].answer), ground_truth_answer)
            with test("""no note or project was added or deleted"""):
                test.case(len(models.end.simple_note.Note.all()), "==", len(models.start.simple_note.Note.all()))
                test.case(len(models.end.todoist.Project.all()), "==", len(models.start.todoist.Project.all()))
        '''
    elif kind == "add_tag":
        body = f'''
            title, tag = {task["title"]!r}, {task["tag"]!r}
            with test("""the task is marked complete with status 'success'"""):
                test.case(models.end.supervisor.Task.all()[0].status, "==", "success")
            with test("""the note {task["title"]} has the tag {task["tag"]}"""):
                note = models.end.simple_note.Note.find_one(title=title)
                test.case(tag in note.tags, "==", True)
            with test("""the note {task["title"]} keeps its other tags"""):
                before = models.start.simple_note.Note.find_one(title=title)
                note = models.end.simple_note.Note.find_one(title=title)
                test.case(sorted(note.tags), "==", sorted(before.tags + [tag]))
            with test("""no other note changed"""):
                others_before = {{n.title: sorted(n.tags) for n in models.start.simple_note.Note.all() if n.title != title}}
                others_after = {{n.title: sorted(n.tags) for n in models.end.simple_note.Note.all() if n.title != title}}
                test.case(others_after, "==", others_before)
        '''
    elif kind == "create_note":
        body = f'''
            title, content = {task["title"]!r}, {task["content"]!r}
            with test("""the task is marked complete with status 'success'"""):
                test.case(models.end.supervisor.Task.all()[0].status, "==", "success")
            with test("""a note titled {task["title"]} exists"""):
                test.case(models.end.simple_note.Note.find_one(title=title) is not None, "==", True)
            with test("""the new note has the requested content"""):
                note = models.end.simple_note.Note.find_one(title=title)
                test.case(note.content.strip() if note else None, "==", content)
            with test("""exactly one note was added"""):
                test.case(len(models.end.simple_note.Note.all()), "==", len(models.start.simple_note.Note.all()) + 1)
        '''
    elif kind == "delete_note":
        body = f'''
            title = {task["title"]!r}
            with test("""the task is marked complete with status 'success'"""):
                test.case(models.end.supervisor.Task.all()[0].status, "==", "success")
            with test("""the note {task["title"]} is deleted"""):
                test.case(models.end.simple_note.Note.find_one(title=title), "==", None)
            with test("""every other note is kept"""):
                test.case(len(models.end.simple_note.Note.all()), "==", len(models.start.simple_note.Note.all()) - 1)
        '''
    else:
        raise ValueError(kind)
    return head + "    import json\n" + dedent(body).replace("\n", "\n    ").rstrip() + "\n"


def _answer(task: dict):
    if task["kind"] == "count_tag":
        return sum(task["tag"] in tags for _, _, tags in NOTES)
    if task["kind"] == "todo_count":
        return len(TODO_PROJECTS)
    return None


def _test_requirements(code: str) -> list[str]:
    import re

    return [dedent(m).strip() for m in re.findall(r'with test\("""(.*?)"""\)', code, flags=re.S)]


def _write_api_docs(app_names: list[str]) -> dict[str, list[dict]]:
    from appworld.api_docs import prepare_api_docs
    from appworld.common.constants import CANARY_STRING
    from appworld.common.path_store import path_store
    from appworld.common.utils import write_json

    directory = os.path.join(path_store.data, "api_docs", "standard")
    os.makedirs(directory, exist_ok=True)
    docs = {}
    for app in app_names:
        items = prepare_api_docs(app)
        docs[app] = items
        write_json({d["api_name"]: {**d, "canary_string": CANARY_STRING} for d in items},
                   os.path.join(directory, app + ".json"), silent=True)
    return docs


def _build_task(task: dict, api_docs: dict[str, list[dict]]) -> None:
    from datetime import datetime

    from appworld.apps import get_all_apps
    from appworld.collections.models import ModelCollection
    from appworld.common.constants import DB_VERSION
    from appworld.ground_truth import GroundTruth
    from appworld.task import Task

    all_apps = get_all_apps()
    models = ModelCollection.load(to_db_home_path=f":memory:hsgen-{task['id']}", load_apps=all_apps,
                                  create_db=True)
    admin, sup = models.admin, models.supervisor
    main_user = admin.MainUser.create_save(**SUPERVISOR)
    supervisor = sup.Supervisor.create_save(**SUPERVISOR)
    for account, password in (("simple_note", NOTE_PASSWORD), ("todoist", TODO_PASSWORD)):
        admin.AccountPassword.create_save(main_user_id=main_user.id, account_name=account, password=password)
        sup.AccountPassword.create_save(supervisor_id=supervisor.id, account_name=account, password=password)
    sup.Task.create_save(supervisor_id=supervisor.id, instruction=task["instruction"])
    note_user = models.simple_note.User.create_save(first_name="Ada", last_name="Lovelace",
                                                     email=SUPERVISOR["email"], password=NOTE_PASSWORD,
                                                     verified=True)
    for title, content, tags in NOTES:
        models.simple_note.Note.create_save(user_id=note_user.id, title=title, content=content, tags=tags)
    todo_user = models.todoist.User.create_save(first_name="Ada", last_name="Lovelace", email=SUPERVISOR["email"],
                                                password=TODO_PASSWORD, verified=True)
    for name in TODO_PROJECTS:
        _create_todo_project(models, todo_user, name)
    for app, items in api_docs.items():
        for d in items:
            models.api_docs.ApiDoc.create_save(app_name_=d["app_name"], api_name=d["api_name"], path=d["path"],
                                               method=d["method"], description=d["description"],
                                               parameters=d["parameters"],
                                               response_schemas=d["response_schemas"])

    from appworld.apps.admin.models import MainUserMunch

    spec_task = Task(id=task["id"], instruction=task["instruction"],
                     supervisor=MainUserMunch(**{k: SUPERVISOR[k] for k in
                                                 ("first_name", "last_name", "email", "phone_number")}),
                     datetime=datetime.fromisoformat(DATE_TIME), allowed_apps=get_all_apps(skip_admin=True),
                     db_version=DB_VERSION, model_collection=models)
    evaluation_code = _evaluation_code(task)
    spec_task.ground_truth = GroundTruth(
        task_id=task["id"], required_apps=[task["app"]], public_data={}, private_data={}, answer=_answer(task),
        evaluation_code=evaluation_code, solution_code="", compiled_solution_code="", generator_code="",
        test_data=[{"requirement": r, "label": "no_op_fail"} for r in _test_requirements(evaluation_code)],
        metadata={"difficulty": 1, "mode": "minimal", "generator": "verl_hindsight", "num_apps": 1,
                  "num_apis": 0, "num_solution_code_lines": sum(len(a.splitlines()) for a in task["oracle"])},
    )
    spec_task.save(delete_if_exists=True, model_collection_format="full")
    models.close()


def _create_todo_project(models, user, name: str) -> None:
    project = models.todoist.Project.create_save(user_id=user.id, name=name)
    models.todoist.ProjectCollaboratorLink.create_save(project_id=project.id, user_id=user.id)


def generate(root: str) -> dict:
    """Build every task of :data:`TASKS` under ``root/data`` (runs in the AppWorld venv)."""
    os.makedirs(root, exist_ok=True)
    os.environ["APPWORLD_ROOT"] = root
    from appworld import update_root
    from appworld.apps import get_all_apps

    update_root(root)
    import appworld.ground_truth

    # GroundTruth.save() formats the files with ruff, an optional dependency; the files are already formatted.
    appworld.ground_truth.run_ruff = lambda *args, **kwargs: None
    from appworld.apps.api_lib import set_local_date_and_time

    freezer = set_local_date_and_time(DATE_TIME)
    api_docs = _write_api_docs(get_all_apps(skip_admin=True))
    for task in TASKS:
        _build_task(task, api_docs)
    freezer.stop()
    datasets = os.path.join(root, "data", "datasets")
    os.makedirs(datasets, exist_ok=True)
    splits = {"train": [t["id"] for t in TASKS if t["split"] == "train"],
              "dev": [t["id"] for t in TASKS if t["split"] == "val"]}
    for name, ids in splits.items():
        with open(os.path.join(datasets, name + ".txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    meta = {"generator_version": GENERATOR_VERSION, "splits": splits,
            "tasks": {t["id"]: {"oracle": t["oracle"], "wrong": t["wrong"], "app": t["app"],
                                "instruction": t["instruction"]} for t in TASKS}}
    with open(os.path.join(root, TASKS_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build verl-hindsight's offline AppWorld tasks (AppWorld venv).")
    parser.add_argument("--root", required=True)
    args = parser.parse_args(argv)
    meta = generate(os.path.abspath(args.root))
    print(json.dumps({"root": os.path.abspath(args.root), "splits": meta["splits"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
