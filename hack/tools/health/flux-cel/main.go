// Command atlas-health-flux evaluates Flux Kustomization healthCheckExprs on objects with Flux's
// own evaluator (github.com/fluxcd/pkg/runtime/cel, what kustomize-controller runs): the
// observedGeneration check first, then inProgress, failed and current in that order, InProgress
// when none holds.
//
//	atlas-health-flux -exprs exprs.json < list.json > results.json
//
// exprs.json is the healthCheckExprs list as JSON ({apiVersion, kind, current, failed,
// inProgress}); list.json a v1 List of objects. Each result is {"status"} or {"error"}.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/fluxcd/pkg/apis/kustomize"
	"github.com/fluxcd/pkg/runtime/cel"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

type result struct {
	Status string `json:"status,omitempty"`
	Error  string `json:"error,omitempty"`
}

func main() {
	exprsPath := flag.String("exprs", "", "the healthCheckExprs list, as JSON")
	flag.Parse()
	raw, err := os.ReadFile(*exprsPath)
	if err != nil {
		fail("reading -exprs: %v", err)
	}
	var exprs []kustomize.CustomHealthCheck // the type of a Kustomization's spec.healthCheckExprs items
	if err := json.Unmarshal(raw, &exprs); err != nil {
		fail("parsing -exprs: %v", err)
	}
	evaluators := map[string]*cel.StatusEvaluator{}
	for i := range exprs {
		evaluator, err := cel.NewStatusEvaluator(&exprs[i].HealthCheckExpressions)
		if err != nil {
			fail("healthCheckExprs for %s %s: %v", exprs[i].APIVersion, exprs[i].Kind, err)
		}
		evaluators[exprs[i].APIVersion+"/"+exprs[i].Kind] = evaluator
	}
	// decoded as the API machinery does: whole numbers as int64, as metadata.generation must be
	var list unstructured.UnstructuredList
	data, err := io.ReadAll(os.Stdin)
	if err == nil {
		err = list.UnmarshalJSON(data)
	}
	if err != nil {
		fail("reading objects from stdin: %v", err)
	}
	results := make([]result, 0, len(list.Items))
	for i := range list.Items {
		u := &list.Items[i]
		evaluator, ok := evaluators[u.GetAPIVersion()+"/"+u.GetKind()]
		if !ok {
			fail("no healthCheckExprs for %s %s", u.GetAPIVersion(), u.GetKind())
		}
		res, err := evaluator.Evaluate(context.Background(), u)
		if err != nil {
			results = append(results, result{Error: err.Error()})
			continue
		}
		results = append(results, result{Status: res.Status.String()})
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		fail("writing results: %v", err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "atlas-health-flux: "+format+"\n", args...)
	os.Exit(2)
}
