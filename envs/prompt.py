"""THE prompt format: the chat messages a policy sees before each action, and the whole
conversation of a finished episode (the same function, one turn longer).

    system:    "You are playing a text game. <task>" + the reply rule
               [+ "Experience from earlier games:" + the experience: teacher view only]
    user:      <observation 0> + "Which action do you take? Options: look around, take shoe, ..."
    assistant: <action 0>            (the action the game got: actions.py says why)
    user:      <observation 1> + the question and the options
    ...

Why the user turn ends in a question with the options comma-separated
(`python -m bench.prompt_format`, bench/results/prompt_format.json, BENCHMARKS.md "The
prompt format for small models"): SmolLM2-135M-Instruct, greedy, on twc (one room, two
items) dev seeds. With the observation followed by a bulleted "Valid actions:" list (the
format before) it repeats the observation as its reply: 32 of 32 first replies invalid,
and 160 of 160 replies invalid in 16 episodes (score 0). Moving the list first, adding a
"Your next action:" cue, commas, a shorter or no system message, or an example reply did
not change that (0-9% of first replies an action). Ending the turn with a question the
model answers ("Which action do you take? Options: ...") does: with this system message
84% of first replies map to a valid action ("You should take a pen." -> "take pen"), and
over 100 dev episodes of 10 steps 65% of replies are actions (36% exact, 29% mapped), mean
score 0.228, success 0 (it takes items, then often puts them in the wrong place or keeps
saying "take X"). The same question under a short system message: 34% of first replies,
score 0.03 over 16 episodes. The action rule (actions.py) is unchanged: a rule that also
maps a reply CONTAINING a valid action rescued no invalid reply in any variant.

The student view is the same with experience=None, so a teacher episode becomes a
student training row by rebuilding it without the experience (episode_messages).
"""

from __future__ import annotations

from collections.abc import Sequence

from envs.base import Episode

RULES = (
    "Each turn you see what happened and the list of valid actions. Reply with one action "
    "from the list, written exactly as it appears there, and nothing else."
)
QUESTION = "Which action do you take?"


def system_message(task: str, experience: str | None = None) -> str:
    text = f"You are playing a text game. {task.strip()}\n\n{RULES}"
    if experience:
        text += f"\n\nExperience from earlier games:\n{experience.strip()}"
    return text


def user_message(observation: str, valid_actions: Sequence[str]) -> str:
    """The observation, then the question the model answers with an action (module
    docstring: a question, not a list after the observation, is what a small model
    answers instead of repeating the observation)."""
    options = ", ".join(valid_actions)
    return f"{observation.strip()}\n\n{QUESTION} Options: {options}."


def messages(
    task: str,
    observations: Sequence[str],
    valid_actions: Sequence[Sequence[str]],
    actions: Sequence[str],
    experience: str | None = None,
) -> list[dict]:
    """The conversation [{"role", "content"}, ...]: system, then user (observation i, the
    question and valid_actions[i]) and assistant (actions[i]) alternating.

    len(observations) == len(actions) + 1: a prompt for the next action (ends with a user
    turn); len(observations) == len(actions): a finished conversation (ends with the last
    action), as trained on. experience (teacher view) goes into the system message.
    """
    if len(valid_actions) != len(observations):
        raise ValueError(
            f"{len(observations)} observations but {len(valid_actions)} valid-action lists"
        )
    if len(observations) - len(actions) not in (0, 1):
        raise ValueError(
            f"{len(observations)} observations and {len(actions)} actions: a conversation "
            "has one observation per action, plus one when it asks for the next action"
        )
    out = [{"role": "system", "content": system_message(task, experience)}]
    for i, observation in enumerate(observations):
        out.append({"role": "user", "content": user_message(observation, valid_actions[i])})
        if i < len(actions):
            out.append({"role": "assistant", "content": actions[i]})
    return out


def episode_messages(episode: Episode, experience: str | None = None) -> list[dict]:
    """A finished episode's conversation: every action is an assistant turn (a trained
    span), the last observation (what the last action led to) is left out."""
    n = episode.steps
    return messages(
        episode.task,
        episode.observations[:n],
        episode.valid_actions[:n],
        episode.actions,
        experience,
    )
