"""The side-by-side arena: one prompt, two models, two panes, one stored conversation."""

from __future__ import annotations

import pytest

from appleslm.generate import ChatSession, ModelChoice
from appleslm.io.model_dir import load_model, save_model_dir
from appleslm_tui.arena import ArenaApp, interleave
from appleslm_tui.store import Store
from tests.helpers import build_tiny
from tests.tui.conftest import GREEDY
from tests.tui.tui_helpers import send, wait_until

SIZE = (100, 30)


def alone(model_dir, messages) -> str:
    model, tokenizer = load_model(model_dir)
    session = ChatSession(model, tokenizer)
    return "".join(r.text for r in session.stream(messages, GREEDY))


def test_interleave_takes_one_of_each_in_turn():
    assert list(interleave([iter("ab"), iter("xyz")])) == [
        (0, "a"), (1, "x"), (0, "b"), (1, "y"), (1, "z"),
    ]  # fmt: skip


@pytest.mark.parametrize("one_at_a_time", [False, True])
async def test_both_models_answer_the_same_prompt_side_by_side(
    one_at_a_time, tiny_model_dir, tokenizer_dir, tmp_path
):
    other = save_model_dir(tmp_path / "other", build_tiny(1), tokenizer_dir=tokenizer_dir)
    a, b = str(tiny_model_dir), str(other)
    app = ArenaApp(
        a,
        ModelChoice(b, draft=b, draft_tokens=2),
        home=tmp_path / "home",
        settings=GREEDY,
        one_at_a_time=one_at_a_time,
    )
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.sessions is not None)
        mode = "one after the other" if one_at_a_time else "both at once"
        assert mode in app.sub_title and "draft" in app.sub_title
        await send(pilot, "The Congress shall have power")
        await wait_until(pilot, lambda: app.generating)
        await wait_until(pilot, lambda: not app.generating)
        question = [{"role": "user", "content": "The Congress shall have power"}]
        replies = [app.log_of(i).items[-1].content for i in range(2)]
        # each pane holds its model's own greedy reply, as if it had been asked alone
        assert replies == [alone(a, question), alone(b, question)]
        assert app.sessions[1].stats.acceptance is not None
        assert "draft" in str(app.speed_of(1).render())
        assert "draft" not in str(app.speed_of(0).render())

        await send(pilot, "to lay and collect taxes")  # a second turn reuses each cache
        await wait_until(pilot, lambda: app.generating)
        await wait_until(pilot, lambda: not app.generating)
        assert all(session.stats.cached_tokens > 0 for session in app.sessions)
        store = Store.open(tmp_path / "home")
        stored = store.messages(app.conversation.id)
        assert [m.role for m in stored] == ["user", "assistant", "assistant"] * 2
        assert [m.stats["model"] for m in stored if m.role == "assistant"] == [
            "tiny", "other + draft (other, 2 tokens)"
        ] * 2  # fmt: skip
        assert [m.content for m in stored[1:3]] == replies
        store.close()
