"""`smolvlm chat`: talk with a model in the terminal. Answers stream in; the conversation (and its
images) is kept across turns; `/image PATH` attaches an image to the next question, `/reset` starts
over, `/quit` (or end of input) ends."""

from __future__ import annotations

import argparse
import sys

from smolvlm.cli.options import add_model_options
from smolvlm.errors import SmolVLMError

HELP = "commands: /image PATH (attach to the next question), /reset (forget the conversation), /quit"


class Chat:
    """The conversation: messages in the processor's format, and its images in prompt order."""

    def __init__(self, model, processor, params, system: str | None = None):
        from smolvlm.generation import ImageEmbeddingCache

        self.model, self.processor, self.params, self.system = model, processor, params, system
        # every turn re-sends the conversation's images: their embeddings are computed once per session
        self.image_cache = ImageEmbeddingCache()
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        if self.system:
            self.messages.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        self.images: list = []  # images of the turns so far
        self.pending: list = []  # images attached to the next question

    def attach(self, path: str) -> None:
        from smolvlm.processing import open_image

        if not self.model.has_vision:
            raise SmolVLMError("this is a text-only model (no vision encoder); it cannot take images")
        self.pending.append(open_image(path))

    def ask(self, question: str, out) -> str:
        """Stream the answer to `out`; the turn joins the conversation once it is answered (an error or
        Ctrl-C leaves the conversation as it was, with a partial answer kept after Ctrl-C)."""
        from smolvlm.generation import TextStream

        content = [{"type": "image"}] * len(self.pending) + [{"type": "text", "text": question}]
        messages = [*self.messages, {"role": "user", "content": content}]
        images = self.images + self.pending
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(text, images=[images] if images else None)
        stream = TextStream(self.model, self.processor, inputs, self.params, self.image_cache)
        answer = ""
        try:
            for piece in stream:
                answer += piece
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [interrupted]")
        out.write("\n")
        out.flush()
        self.messages = [*messages, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        self.images, self.pending = images, []
        return answer


def cmd_chat(args: argparse.Namespace) -> int:
    from smolvlm.cli.options import load_from_args
    from smolvlm.generation import SamplingParams
    from smolvlm.processing import open_image

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    params.check()
    first_images = [open_image(p) for p in args.image or []]  # fail on a bad image before loading
    model, processor = load_from_args(args)
    chat = Chat(model, processor, params, system=args.system)
    if first_images and not model.has_vision:
        raise SmolVLMError(f"{args.model} is a text-only model (no vision encoder); drop --image")
    chat.pending = first_images

    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"smolvlm chat with {args.model}; {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit"):
                break
            if command == "/reset":
                chat.reset()
                print("(conversation cleared)", file=sys.stderr)
            elif command == "/image":
                try:
                    chat.attach(rest.strip())
                    print(f"(image attached to the next question: {rest.strip()})", file=sys.stderr)
                except SmolVLMError as e:
                    print(f"error: {e}", file=sys.stderr)
            else:
                print(f"unknown command {command}; {HELP}", file=sys.stderr)
            continue
        if interactive:
            sys.stdout.write("bot> ")
        try:
            chat.ask(line, sys.stdout)
        except SmolVLMError as e:  # e.g. the conversation outgrew the context: say so, keep chatting
            print(f"\nerror: {e}" + ("; /reset starts over" if "context" in str(e) else ""), file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    c = subparsers.add_parser(
        "chat", help="chat with a model in the terminal (streams, keeps the conversation)",
        description="An interactive chat: type a question, the answer streams in, the conversation is kept. "
                    f"{HELP}. Reads questions from stdin line by line when it is not a terminal.",
    )
    add_model_options(c)
    c.add_argument("--image", action="append", metavar="FILE", help="image(s) for the first question; repeatable")
    c.add_argument("--system", metavar="TEXT", help="a system message at the start of the conversation")
    c.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="per answer (default: %(default)s)")
    c.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default) is greedy")
    c.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (default 1: off)")
    c.add_argument("--seed", type=int, default=None, metavar="S", help="seed for sampling")
    c.set_defaults(func=cmd_chat)
