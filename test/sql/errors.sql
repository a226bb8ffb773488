-- Bad input: a pg_llm error with a HINT that says what to fix, and nothing written.
\set VERBOSITY default
\set SHOW_CONTEXT never
INSERT INTO llm_model_config (name, n_layer, n_head, n_embd, n_ctx, vocab_size)
VALUES ('regress-err', 1, 2, 16, 8, 301);
SELECT m.name, m.config, m.step FROM llm_model_init('e', 'regress-err', seed => 1) AS m;
SELECT count(*) AS tensors_before FROM llm_tensor;
-- unknown model, unknown config, existing model
SELECT llm_logits('nope', '{1,2}');
SELECT llm_model_create('x', 'no-such-config');
SELECT llm_model_create('e', 'regress-err');
-- token ids out of range, too many tokens for the context, empty input
SELECT llm_logits('e', '{1,301}');
SELECT llm_logits('e', '{1,2,3,4,5,6,7,8,9}');
SELECT llm_logits('e', '{}');
SELECT llm_decode('{50257}');
SELECT llm_encode('x', tokenizer => 'nope');
-- targets that do not match the tokens
SELECT llm_loss('e', '{1,2,3}', '{1,2}');
-- training without data
SELECT llm_train_step('e', 'no-such-dataset');
-- training arguments: checked before anything is written
INSERT INTO llm_dataset_source (dataset, source_hash, tokenizer, block_size, stride, val_fraction, documents, tokens,
                                train_rows, val_rows, encoder, sources)
VALUES ('d', 'regress', 'gpt2', 4, 4, 0, 1, 8, 2, 0, 'regress', '{}');
INSERT INTO llm_dataset (dataset, split, tokens, targets, source_hash, pos)
VALUES ('d', 'train', '{1,2,3,4}', '{2,3,4,5}', 'regress', 0), ('d', 'train', '{5,6,7,8}', '{6,7,8,9}', 'regress', 1);
SELECT llm_train_step('e', 'd', batch_size => 2, lr => 'NaN');
SELECT llm_train_step('e', 'd', batch_size => 3);
SELECT llm_train_step('e', 'd', batch_size => 2, min_lr => 1.0, lr => 1e-4);
SELECT llm_train('e', 0, dataset => 'd');
SELECT count(*) AS steps_logged FROM llm_train_log;
SELECT count(*) AS tensors_after FROM llm_tensor;
