-- A tiny model initialized from a seed (GPT-2's init, one generator per tile): its logits and loss.
-- Sums are rounded well above float32 BLAS noise (summation order differs between CPUs).
INSERT INTO llm_model_config (name, n_layer, n_head, n_embd, n_ctx, vocab_size)
VALUES ('regress-tiny', 2, 3, 48, 32, 301);
SELECT m.name, m.config, m.step FROM llm_model_init('tiny', 'regress-tiny', seed => 7) AS m;
SELECT name, shape FROM llm_tensors WHERE model = 'tiny' ORDER BY name;
SELECT count(*) AS n, round(sum(x)::NUMERIC, 3) AS sum, round(sqrt(sum(x * x))::NUMERIC, 3) AS l2
FROM unnest(llm_logits('tiny', '{1,2,3,250}')) AS x;
SELECT round(llm_loss('tiny', '{1,2,3,4}', '{2,3,4,5}')::NUMERIC, 4) AS loss;
SELECT round(perplexity::NUMERIC, 2) AS perplexity, tokens_scored FROM llm_perplexity_tokens('tiny', '{1,2,3,4,5,6}');
