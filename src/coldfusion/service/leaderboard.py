"""What the service's web page shows: versions with their status and scores on the
operator's suite (gain over the pretrained root, per task, as the model-recycling
leaderboard shows them), and each contributor's history. Public, like the versions: no
task names (a task can say what private data a contributor holds), no settings."""

import statistics

from coldfusion.repository import Repository, Version
from coldfusion.service.suite import RUN, judged
from coldfusion.service.tokens import ServiceStore


def status(version: Version, suite_enabled: bool, repo: Repository) -> str:
    """The version's own status (Version.status), a live one split by the operator's suite
    into pending (not ruled on yet) and published."""
    if not version.live:
        return version.status
    return "pending" if suite_enabled and not judged(repo, version) else "published"


def leaderboard(repo: Repository, suite_enabled: bool) -> dict:
    versions = repo.versions()
    scores = {v.id: {m["task"]: 100 * m["values"]["accuracy"] for m in repo.metrics(v.id)
                     if m["run"] == RUN and m["protocol"] == "linear_probe"} for v in versions}
    root = next((v for v in versions if v.parent is None), None)
    reference = scores.get(root.id, {}) if root else {}
    tasks = sorted(reference)
    rows = []
    for v in versions:
        own = scores[v.id]
        complete = tasks and all(t in own for t in tasks)
        score = statistics.fmean(own[t] for t in tasks) if complete else None
        rows.append({
            "id": v.id, "parent": v.parent, "created": v.created, "status": status(v, suite_enabled, repo),
            "reason": v.held_back or v.abandoned,
            "contributions": len((v.fusion or {}).get("contributions", [])),
            "score": score, "gain": score - statistics.fmean(reference.values()) if complete else None,
            "task_gains": {t: own[t] - reference[t] for t in tasks if t in own}})
    return {"tasks": tasks, "versions": rows}


def contributors(repo: Repository, store: ServiceStore) -> list[dict]:
    """Per contributor: counts, and every contribution and refused upload, oldest first."""
    people: dict[str, dict] = {r["contributor"]: {"contributor": r["contributor"], "history": []}
                               for r in store.contributors()}
    for c in repo.contributions():
        if c.run_id is not None:  # a run's own contributors are not the service's
            continue
        people.setdefault(c.contributor, {"contributor": c.contributor, "history": []})["history"].append(
            {"created": c.created, "id": c.id, "base_version": c.base_version, "status": c.status,
             "fused_into": c.fused_into, "reason": c.reason})
    for refusal in repo.refusals():
        if refusal.run_id is None:
            person = people.setdefault(refusal.contributor, {"contributor": refusal.contributor, "history": []})
            person["history"].append({"created": refusal.created, "id": None, "status": f"refused ({refusal.rule})",
                                      "reason": refusal.reason})
    for person in people.values():
        person["history"].sort(key=lambda h: h["created"])
        states = [h["status"] for h in person["history"]]
        person.update(fused=states.count("fused"), waiting=states.count("waiting"),
                      refused=sum(s.startswith("refused") for s in states))
    return sorted(people.values(), key=lambda p: p["contributor"])
