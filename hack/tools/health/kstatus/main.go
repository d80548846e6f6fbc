// Command atlas-health-kstatus computes the kstatus of objects with sigs.k8s.io/cli-utils'
// status.Compute: what kpt, cli-utils appliers and `kubectl wait`-like pollers conclude
// (InProgress, Current, Failed, Terminating, NotFound, Unknown) and why.
//
//	atlas-health-kstatus < list.json > results.json
//
// objects.json is a v1 List of objects; each result is {"status", "message"} or {"error"}.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Status  string `json:"status,omitempty"`
	Message string `json:"message,omitempty"`
	Error   string `json:"error,omitempty"`
}

func main() {
	// decoded as the API machinery does: whole numbers as int64, as metadata.generation must be
	var list unstructured.UnstructuredList
	data, err := io.ReadAll(os.Stdin)
	if err == nil {
		err = list.UnmarshalJSON(data)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "atlas-health-kstatus: reading objects from stdin: %v\n", err)
		os.Exit(2)
	}
	results := make([]result, 0, len(list.Items))
	for i := range list.Items {
		res, err := status.Compute(&list.Items[i])
		if err != nil {
			results = append(results, result{Error: err.Error()})
			continue
		}
		results = append(results, result{Status: res.Status.String(), Message: res.Message})
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		fmt.Fprintf(os.Stderr, "atlas-health-kstatus: writing results: %v\n", err)
		os.Exit(2)
	}
}
