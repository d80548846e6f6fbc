// Command atlas-health-argocd runs Argo CD health checks (resource.customizations.health.*) on
// objects, the way Argo CD's application controller runs a health script from argocd-cm: in
// gopher-lua, with only the package, base and table libraries open (no string, io or os library
// unless the customization sets useOpenLibs), the object as the global `obj` decoded from JSON,
// and a one-second limit. The script's returned table gives the status and message.
//
//	atlas-health-argocd -script health.lua < objects.json > results.json
//
// objects.json is a JSON array of objects, each checked by the one script. Each result is
// {"status", "message"} or {"error"} (Argo CD shows an error as health Unknown).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
)

// The statuses Argo CD accepts from a script; any other reads Unknown.
var validStatus = map[string]bool{
	"Healthy": true, "Progressing": true, "Degraded": true, "Suspended": true, "Missing": true, "Unknown": true,
}

type result struct {
	Status  string `json:"status,omitempty"`
	Message string `json:"message,omitempty"`
	Error   string `json:"error,omitempty"`
}

func main() {
	scriptPath := flag.String("script", "", "the health script (Lua)")
	flag.Parse()
	script, err := os.ReadFile(*scriptPath)
	if err != nil {
		fail("reading -script: %v", err)
	}
	var objects []map[string]any
	if err := json.NewDecoder(os.Stdin).Decode(&objects); err != nil {
		fail("reading objects from stdin: %v", err)
	}
	results := make([]result, 0, len(objects))
	for _, obj := range objects {
		results = append(results, health(obj, string(script)))
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		fail("writing results: %v", err)
	}
}

func health(obj map[string]any, script string) result {
	L := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer L.Close()
	for name, open := range map[string]lua.LGFunction{
		lua.LoadLibName: lua.OpenPackage, lua.BaseLibName: lua.OpenBase, lua.TabLibName: lua.OpenTable,
	} {
		if err := L.CallByParam(lua.P{Fn: L.NewFunction(open), NRet: 0, Protect: true}, lua.LString(name)); err != nil {
			return result{Error: err.Error()}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	L.SetContext(ctx)
	L.SetGlobal("obj", toLua(L, obj))
	if err := L.DoString(script); err != nil {
		return result{Error: err.Error()}
	}
	table, ok := L.Get(-1).(*lua.LTable)
	if !ok {
		return result{Error: fmt.Sprintf("expect table output from Lua script, not %s", L.Get(-1).Type())}
	}
	status, message := lua.LVAsString(table.RawGetString("status")), lua.LVAsString(table.RawGetString("message"))
	if !validStatus[status] {
		return result{Status: "Unknown", Message: "Lua returned an invalid health status"}
	}
	return result{Status: status, Message: message}
}

// toLua converts decoded JSON into Lua values as Argo CD does: objects become tables keyed by
// string, arrays become sequences (1-based), numbers become Lua numbers, null becomes nil.
func toLua(L *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case []any:
		arr := L.CreateTable(len(v), 0)
		for _, item := range v {
			arr.Append(toLua(L, item))
		}
		return arr
	case map[string]any:
		tbl := L.CreateTable(0, len(v))
		for key, item := range v {
			tbl.RawSetH(lua.LString(key), toLua(L, item))
		}
		return tbl
	}
	return lua.LNil
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "atlas-health-argocd: "+format+"\n", args...)
	os.Exit(2)
}
