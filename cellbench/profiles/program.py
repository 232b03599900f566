"""A profile compiled to a flat program, as a cycler's step table: leaf steps, loop heads and loop ends.

Jumps (a limit's `then`) resolve here: `next`, `end`, `break` (out of the innermost loop) or a
label. The same table answers the flow questions asked before a run: does every goto have its
label, is every break inside a loop, and can every step that can run still reach the end?
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from cellbench.profiles.schema import ACTIONS, Profile, RepeatStep, body_of

END = -1


@dataclass
class Instr:
    op: Literal["step", "loop", "endloop"]
    node: Any
    path: tuple[int, ...]
    index: int = 0  # Step Index of a leaf: its number in reading order
    loop_start: int = -1  # for endloop: pc of its loop head
    loop_end: int = -1  # for loop: pc of its end
    enclosing: list[int] = field(default_factory=list)  # pcs of the loop heads around it, outermost first


@dataclass
class Program:
    instrs: list[Instr]
    labels: dict[str, int]

    def after_loop(self, loop_pc: int) -> int:
        return self.instrs[loop_pc].loop_end + 1

    def target(self, pc: int, then: str) -> int:
        """Where `then`, said by the step at pc, sends the run (END for the end of the test)."""
        if then == "next":
            return pc + 1
        if then == "end":
            return END
        if then == "break":
            loops = self.instrs[pc].enclosing
            return self.after_loop(loops[-1]) if loops else END
        return self.labels[then]


def compile_profile(profile: Profile) -> Program:
    """The profile's program: compiled on first use and kept with the profile, so a run (its checks, its engine,
    its registry entry) compiles it once. A profile is not changed once read."""
    program: Program | None = profile._program
    if program is None:
        program = profile._program = _compile(profile)
    return program


def _compile(profile: Profile) -> Program:
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    counter = [0]

    def emit(steps: list[Any], path: tuple[int, ...], enclosing: list[int]) -> None:
        for i, step in enumerate(steps):
            here = (*path, i)
            if isinstance(step, RepeatStep):
                head = len(instrs)
                instrs.append(Instr("loop", step, here, enclosing=list(enclosing)))
                if step.label:
                    labels[step.label] = head
                emit(step.steps, here, [*enclosing, head])
                instrs.append(Instr("endloop", step, here, loop_start=head, enclosing=list(enclosing)))
                instrs[head].loop_end = len(instrs) - 1
            else:
                counter[0] += 1
                label = body_of(step).label
                if label:
                    labels[label] = len(instrs)
                instrs.append(Instr("step", step, here, index=counter[0], enclosing=list(enclosing)))

    emit(profile.steps, (), [])
    return Program(instrs, labels)


def _path_key(path: tuple[int, ...]) -> tuple[str | int, ...]:
    """steps[2].steps[0] as the data path ('steps', 2, 'steps', 0)."""
    return tuple(x for i in path for x in ("steps", i))


def flow_problems(profile: Profile) -> list[tuple[tuple[str | int, ...], str]]:
    """Unknown labels, breaks outside loops, duplicate labels, and loops that can never end."""
    program = compile_profile(profile)
    problems: list[tuple[tuple[str | int, ...], str]] = []
    seen: dict[str, tuple[int, ...]] = {}
    for ins in program.instrs:
        label = ins.node.label if ins.op == "loop" else body_of(ins.node).label if ins.op == "step" else None
        if label:
            if label in ACTIONS:
                problems.append((_path_key(ins.path), f"'{label}' cannot be a label: it is a flow word"))
            if label in seen:
                problems.append((_path_key(ins.path), f"label '{label}' is used twice"))
            seen[label] = ins.path
    for ins in program.instrs:
        for then in _thens(ins):
            if then not in ACTIONS and then not in program.labels:
                known = ", ".join(sorted(program.labels)) or "none"
                problems.append((_path_key(ins.path), f"goto '{then}': no step has that label (labels: {known})"))
            if then == "break" and not ins.enclosing and ins.op == "step":
                problems.append((_path_key(ins.path), "'break' outside any repeat"))
    if problems:
        return problems
    stuck = _cannot_finish(program)
    if stuck is not None:
        ins = program.instrs[stuck]
        problems.append((_path_key(ins.path), "a loop that can never end: every way on from this step leads back"))
    return problems


def _thens(ins: Instr) -> list[str]:
    if ins.op == "step":
        body = body_of(ins.node)
        return [lim.then for lim in body.until] + [c.then for c in body.check]
    if ins.op == "loop" and ins.node.time_limit is not None:
        return [ins.node.then]
    return []


def _successors(program: Program, pc: int) -> set[int]:
    ins = program.instrs[pc]
    if ins.op == "endloop":
        return {ins.loop_start + 1, pc + 1}  # a counted loop always gets out in the end
    if ins.op == "loop":
        out = {pc + 1}
        if ins.node.time_limit is not None:
            then = ins.node.then
            out.add(program.after_loop(pc) if then == "next" else program.target(pc, then))
        return out
    body = body_of(ins.node)
    out = {program.target(pc, lim.then) for lim in body.until} | {program.target(pc, c.then) for c in body.check}
    if not body.until or any(lim.then == "next" for lim in body.until) or _implicitly_ends(ins.node):
        out.add(pc + 1)
    for loop_pc in ins.enclosing:  # a loop's time budget can end any step inside it
        if program.instrs[loop_pc].node.time_limit is not None:
            out.add(program.after_loop(loop_pc))
    return out


def _implicitly_ends(step: Any) -> bool:
    body = body_of(step)
    ends_itself = ("ramp", "pulse", "wait", "set", "eis", "schedule")
    return getattr(body, "duration", None) is not None or step.kind in ends_itself or (
        step.kind == "drive" and not body.repeat
    )


def _cannot_finish(program: Program) -> int | None:
    """The first reachable pc from which the end can no longer be reached, if any."""
    n = len(program.instrs)
    norm = {END: n}
    succ = {pc: {norm.get(s, s) for s in _successors(program, pc)} for pc in range(n)}
    reach_end = {n}
    changed = True
    while changed:
        changed = False
        for pc in range(n):
            if pc not in reach_end and succ[pc] & reach_end:
                reach_end.add(pc)
                changed = True
    reachable, todo = {0}, [0]
    while todo:
        pc = todo.pop()
        for s in succ.get(pc, set()):
            if s < n and s not in reachable:
                reachable.add(s)
                todo.append(s)
    stuck = sorted(pc for pc in reachable if pc not in reach_end)
    return stuck[0] if stuck else None
