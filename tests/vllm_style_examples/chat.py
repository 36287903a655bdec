"""Chat with OpenAI-style content parts, as vLLM's chat example does."""

import argparse

from fxllm import LLM, SamplingParams

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    args = parser.parse_args(argv)
    llm = LLM(model=args.model, enforce_eager=True, max_model_len=128, chat_template=TEMPLATE)
    sampling_params = SamplingParams(temperature=0.5, max_tokens=12, seed=1)
    conversation = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "Write an essay"}]},
    ]
    outputs = llm.chat(conversation, sampling_params, use_tqdm=False)
    conversations = [conversation, [{"role": "user", "content": "Who are you?"}]]
    outputs += llm.chat(conversations, sampling_params, use_tqdm=False)
    for output in outputs:
        print(f"Prompt: {output.prompt!r}, Generated text: {output.outputs[0].text!r}")
    return outputs


if __name__ == "__main__":
    main()
