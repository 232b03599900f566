"""The program walker: moves a run's position through the compiled program (loops, jumps, time budgets).

Pure bookkeeping on a `RunState`; the engine asks it for the next step to run and tells it where a
step's end sends the program.
"""

from __future__ import annotations

from cellbench.bench.runtime.runstate import Budget, RunState
from cellbench.profiles.program import END, Program


class Walker:
    def __init__(self, program: Program, state: RunState) -> None:
        self.program = program
        self.state = state

    def start(self, time_limit: float | None) -> None:
        """A fresh run: the profile's own time limit is the outermost budget."""
        if time_limit is not None:
            self.state.budgets.append(Budget(deadline=time_limit, target=END, name="the profile's time limit",
                                             loop_pc=-1))

    def next_step(self, now: float) -> int | None:
        """Pass loop heads and ends up to the next leaf step and return its pc; None when the program is over."""
        prog, st = self.program.instrs, self.state
        while 0 <= st.pc < len(prog):
            ins = prog[st.pc]
            if ins.op == "loop":
                st.counters[st.pc] = 0
                if ins.node.time_limit is not None:
                    then = ins.node.then
                    target = self.program.after_loop(st.pc) if then == "next" else self.program.target(st.pc, then)
                    name = f"the time limit of the repeat at steps{dotted(ins.path)}"
                    st.budgets.append(Budget(deadline=now + ins.node.time_limit, target=target, name=name,
                                             loop_pc=st.pc))
                st.pc += 1
            elif ins.op == "endloop":
                head = ins.loop_start
                st.counters[head] = st.counters.get(head, 0) + 1
                if st.counters[head] < ins.node.repeat:
                    st.pc = head + 1
                else:
                    st.budgets = [b for b in st.budgets if b.loop_pc != head]
                    st.pc += 1
            else:
                return st.pc
        return None

    def resolve(self, pc: int, target: str | int) -> int:
        """The pc a step's `then` names (next, end, break, a label)."""
        return self.program.target(pc, target) if isinstance(target, str) else target

    def jump(self, pc: int) -> None:
        """Go to pc; the budgets of loops the jump left are over."""
        prog, st = self.program.instrs, self.state
        st.pc = pc
        st.budgets = [
            b for b in st.budgets
            if b.loop_pc < 0 or (pc != END and b.loop_pc < pc <= prog[b.loop_pc].loop_end)
        ]


def dotted(path: tuple[int, ...]) -> str:
    """A step's place in the profile as written: [2].steps[0]."""
    return "".join(f"[{i}]" if k == 0 else f".steps[{i}]" for k, i in enumerate(path))
