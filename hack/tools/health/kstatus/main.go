// Command atlas-health-kstatus computes the kstatus of objects with sigs.k8s.io/cli-utils'
// status.Compute: what kpt, cli-utils appliers and `kubectl wait`-like pollers conclude
// (InProgress, Current, Failed, Terminating, NotFound, Unknown) and why.
//
//	atlas-health-kstatus < objects.json > results.json
//
// objects.json is a JSON array of objects; each result is {"status", "message"} or {"error"}.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Status  string `json:"status,omitempty"`
	Message string `json:"message,omitempty"`
	Error   string `json:"error,omitempty"`
}

func main() {
	objects, err := readObjects(os.Stdin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "atlas-health-kstatus: reading objects from stdin: %v\n", err)
		os.Exit(2)
	}
	results := make([]result, 0, len(objects))
	for _, obj := range objects {
		res, err := status.Compute(&unstructured.Unstructured{Object: obj})
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

// readObjects decodes a JSON array of objects as the API machinery does (whole numbers as int64,
// which unstructured accessors such as metadata.generation require).
func readObjects(in io.Reader) ([]map[string]any, error) {
	data, err := io.ReadAll(in)
	if err != nil {
		return nil, err
	}
	var items []any
	if err := utiljson.Unmarshal(data, &items); err != nil {
		return nil, err
	}
	objects := make([]map[string]any, 0, len(items))
	for i, item := range items {
		obj, ok := item.(map[string]any)
		if !ok {
			return nil, fmt.Errorf("item %d is not an object", i)
		}
		objects = append(objects, obj)
	}
	return objects, nil
}
