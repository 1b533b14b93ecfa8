"""The lorakit app above the core: the ``lorakit`` CLI, one training loop, data, evaluation and
model loading. It imports the core (``lorakit``); the core never imports it.

Data flow of ``lorakit train``::

    cli (parser, dispatch) -> options (TrainOptions: defaults < config file < flags)
      -> cmd_train: jsonl -> data / g2p (records -> tokenised Examples) -> batches
                    models (base model) -> lorakit.inject
                    loop.train(Task from lm_loss / classify; checkpoint every N steps / resume,
                               interrupt on signals, distributed under torchrun)
                      -> lorakit.save_adapter
                    evaluate (before / after) -> files (eval.json), plots (loss.png)
    commands: eval, generate, merge (files.write_folder), info

Needs the ``app`` extra: ``pip install 'lorakit[app]'``.
"""
